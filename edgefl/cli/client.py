"""``edgefl client``: run a device (serve predictions, train on local data, send updates).

This command is the device path: it loads the device runtime only, never the server, the
simulation or their dependencies (``tests/test_layers.py`` checks the modules it loads).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

from edgefl.cli.options import (add_logging_option, env_option, mechanism_list, non_negative_float,
                                positive_float)
from edgefl.device.client import EdgeClient
from edgefl.device.local_data import DataFileError, Samples, describe_skipped, read_samples
from edgefl.transport.mqtt import BrokerUnreachable
from edgefl.trust import TrustError
from edgefl.trust.bundle import load_bundle

log = logging.getLogger("edgefl")


def add_client_arguments(parser) -> None:
    """The options of ``edgefl client``."""
    connection = parser.add_argument_group("connection")
    env_option(connection, "--bundle", env="EDGEFL_BUNDLE", metavar="DIR",
               help="this device's bundle from `edgefl fleet add-device ID`: broker, fleet, id, "
                    "login, CA and the server's keys (the options below override it)")
    env_option(connection, "--broker", env="EDGEFL_BROKER", metavar="URL",
               help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT")
    env_option(connection, "--fleet", env="EDGEFL_FLEET", metavar="NAME",
               help="fleet name, shared with the aggregation server")
    env_option(connection, "--client-id", env="EDGEFL_CLIENT_ID", metavar="ID",
               help="this device's fixed id (1-64 characters from A-Z a-z 0-9 _ . -)")
    env_option(connection, "--trust", env="EDGEFL_TRUST", metavar="FILE",
               help="the server's public keys (trust.json of the bundle)")
    env_option(connection, "--insecure", env="EDGEFL_INSECURE", action="store_true",
               help="accept unsigned server messages and send updates unsealed (plain test "
                    "brokers only: anyone who can publish there can steer this device)")
    env_option(connection, "--freeze-after", env="EDGEFL_FREEZE_AFTER", type=positive_float,
               default=900.0, metavar="S",
               help="warn when no fresh signed round announcement arrived for this long")
    env_option(connection, "--receipt-timeout", env="EDGEFL_RECEIPT_TIMEOUT",
               type=positive_float, default=30.0, metavar="S",
               help="send an update again when its receipt has not come after this long "
                    "(doubling each time)")
    env_option(connection, "--username", env="EDGEFL_USERNAME", help="broker user name")
    env_option(connection, "--password", env="EDGEFL_PASSWORD",
               help="broker password (prefer the environment variable: command lines are visible "
                    "to other users)")
    env_option(connection, "--tls", env="EDGEFL_TLS", action="store_true",
               help="use TLS even for an mqtt:// URL (mqtts:// always does)")
    env_option(connection, "--ca-certs", env="EDGEFL_CA_CERTS", metavar="FILE",
               help="CA bundle that signed the broker's certificate")
    env_option(connection, "--connect-timeout", env="EDGEFL_CONNECT_TIMEOUT", type=positive_float,
               default=30.0, metavar="S", help="give up if the broker is not reachable in time")

    state = parser.add_argument_group("device")
    env_option(state, "--state-dir", env="EDGEFL_STATE_DIR", required=True, metavar="DIR",
               help="where the device keeps its model, outbox and privacy budget across reboots")
    env_option(state, "--data", env="EDGEFL_DATA", required=True, metavar="FILE",
               help="local training data: .npz with arrays X (samples x features) and y, or "
                    ".csv / .parquet with a header and a label column (--label-column); rows "
                    "that do not fit the model are skipped and reported by line")
    env_option(state, "--label-column", env="EDGEFL_LABEL_COLUMN", default="label",
               metavar="NAME", help="the label column of a .csv or .parquet --data file; every "
                                    "other column is a feature")
    env_option(state, "--privacy-budget", env="EDGEFL_PRIVACY_BUDGET", type=positive_float,
               default=100.0, metavar="EPSILON",
               help="total replace-one epsilon this device will ever spend on local DP (basic "
                    "composition over its updates); it sends no local-DP update once spent")
    env_option(state, "--privacy-delta-budget", env="EDGEFL_PRIVACY_DELTA_BUDGET",
               type=non_negative_float, default=1e-5, metavar="DELTA",
               help="total delta it will ever spend (local gaussian rounds spend theirs)")
    env_option(state, "--accept-mechanisms", env="EDGEFL_ACCEPT_MECHANISMS",
               type=mechanism_list, metavar="M1,M2",
               help="privacy mechanisms this device takes part with (default all: none, "
                    "central-gaussian, laplace, discrete-laplace, gaussian); it declines other "
                    "rounds and the server does not select it for them")
    env_option(state, "--privacy-file", env="EDGEFL_PRIVACY_FILE", metavar="FILE",
               help="where the spent epsilon is kept (default STATE_DIR/privacy.json); put it "
               "where a new state directory does not reset it")
    env_option(state, "--require-privacy", env="EDGEFL_REQUIRE_PRIVACY", action="store_true",
               help="decline every round the server announces without differential privacy, so "
               "this device never sends an update without it (central counts: the device then "
               "trusts the aggregator with its clipped update)")
    env_option(state, "--capacity", env="EDGEFL_CAPACITY", type=int, default=100_000,
               metavar="N", help="most local training samples kept (the oldest are dropped)")
    env_option(state, "--seed", env="EDGEFL_SEED", type=int, default=0,
               help="seed of local training (minibatch order)")
    env_option(state, "--full-models", env="EDGEFL_FULL_MODELS", action="store_true",
               help="read every new model as a full envelope instead of following the server's "
                    "compressed refreshes (which fall back to the full envelope on their own "
                    "when a version was missed)")
    env_option(state, "--exit-when-finished", env="EDGEFL_EXIT_WHEN_FINISHED", action="store_true",
               help="exit once the server announces the last round is over and the final model "
                    "is live; the device's stats are written to STATE_DIR/stats.json")
    add_logging_option(parser)


def load_client_data(path, label_column: str = "label") -> Samples:
    """The device's local training :class:`~edgefl.device.local_data.Samples` from ``path``
    (``.npz``, ``.csv`` or ``.parquet``); rows that cannot be samples are logged and skipped."""
    try:
        samples = read_samples(path, label_column=label_column)
    except DataFileError as exc:
        raise SystemExit(f"edgefl client: {exc}") from None
    if samples.skipped:
        log.warning("%s", describe_skipped(samples.skipped, samples.source))
    if not len(samples):
        raise SystemExit(f"edgefl client: {path} holds no usable sample")
    return samples


def apply_bundle(args) -> None:
    """Fill the connection options ``--bundle`` provides and the command line did not give.

    Raises
    ------
    SystemExit
        With code 2 for an unusable bundle, or when a required option is missing.
    """
    if args.bundle is not None:
        try:
            bundle = load_bundle(args.bundle)
        except TrustError as exc:
            print(f"edgefl client: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        for name, value in (("broker", bundle.broker), ("fleet", bundle.fleet),
                            ("client_id", bundle.client_id), ("username", bundle.username),
                            ("password", bundle.password), ("ca_certs", str(bundle.ca_certs)),
                            ("trust", str(bundle.trust_file))):
            if getattr(args, name) is None:
                setattr(args, name, value)
    missing = [flag for flag, name in (("--broker", "broker"), ("--fleet", "fleet"),
                                       ("--client-id", "client_id"))
               if getattr(args, name) is None]
    if not args.insecure and args.trust is None:
        missing.append("--trust (or --insecure)")
    if missing:
        print(f"edgefl client: give --bundle DIR (from `edgefl fleet add-device`) or "
              f"{', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)


def run_client(args, *, companion=None) -> int:
    """Run a device until SIGTERM/SIGINT (or the last round with ``--exit-when-finished``).

    Parameters
    ----------
    args : argparse.Namespace
        The options of :func:`add_client_arguments`.
    companion : callable, optional
        ``companion(client, X)`` returns an object with ``start()`` and ``stop() -> dict``,
        started once the device is connected and stopped before it; the dict joins the
        device's ``stats.json``. The simulation's prediction load comes in this way.

    Returns
    -------
    int
        0 after a clean stop, 2 if the broker could not be reached or refused the login.
    """
    apply_bundle(args)
    samples = load_client_data(args.data, args.label_column)
    try:
        client = EdgeClient(
            args.client_id, args.fleet, args.broker, args.state_dir,
            username=args.username, password=args.password, tls=args.tls or None,
            ca_certs=args.ca_certs, privacy_budget=args.privacy_budget,
            privacy_delta_budget=args.privacy_delta_budget,
            accept_mechanisms=args.accept_mechanisms,
            privacy_file=args.privacy_file, require_privacy=args.require_privacy,
            capacity=args.capacity, seed=args.seed, model_refresh=not args.full_models,
            trust=None if args.insecure else args.trust,
            insecure=args.insecure, freeze_after=args.freeze_after,
            receipt_timeout=args.receipt_timeout,
        )
    except (ValueError, OSError) as exc:  # TrustError is a ValueError
        # Bad options (broker URL, ids, state dir, CA file, trust) are the user's to fix.
        print(f"edgefl client: {exc}", file=sys.stderr)
        return 2
    client.add_data(samples.X, samples.y, lines=samples.lines)
    extra = companion(client, samples.X) if companion is not None else None
    # SIGTERM (a service manager, the simulation) stops the device as cleanly as Ctrl-C does.
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    try:
        client.start(timeout=args.connect_timeout)
    except BrokerUnreachable as exc:
        log.error("%s", exc)
        return 2
    except (ValueError, OSError) as exc:
        print(f"edgefl client: {exc}", file=sys.stderr)
        return 2
    if extra is not None:
        extra.start()
    stats = None
    try:
        while not terminated.is_set():
            if args.exit_when_finished and client.finished.is_set():
                break
            terminated.wait(0.2)
    except KeyboardInterrupt:
        log.info("interrupted: stopping")
    finally:
        if extra is not None:
            stats = extra.stop()
        client.stop()
        client.write_stats(extra=stats)
    return 0

