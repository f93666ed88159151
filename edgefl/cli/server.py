"""``edgefl server``: run the aggregation server for one fleet.

Every option can also come from an environment variable (named in ``--help``), e.g.
``EDGEFL_BROKER``; a command-line value wins. ``--fleet-dir`` (from ``edgefl fleet init``) gives
the server its logins, keys and CA; without ``--broker`` it then starts Mosquitto with the fleet's
generated configuration on loopback. ``--insecure`` runs plain anonymous MQTT without signatures
or sealing instead (an embedded Mosquitto on a free loopback port), with a warning.
Restarting with the same ``--state-dir`` resumes the run where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from edgefl.cli.options import (add_logging_option, add_training_arguments, env_option,
                                port_number, positive_float, setup_logging, strategy_option,
                                training_config_from_args)
from edgefl.simulation.datasets import digits_evaluator
from edgefl.transport.mqtt import BrokerUnreachable
from edgefl.wire.protocol import TrainingConfig
from edgefl_server.accounting import CentralPrivacy
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.buffer import BufferConfig
from edgefl_server.downlink import DownlinkConfig
from edgefl_server.influence import DEFAULT_MAX_SAMPLES, DEFAULT_MAX_UPDATE_NORM
from edgefl_server.model_builder import build_mlp
from edgefl_server.mosquitto import BrokerUnavailable, MosquittoBroker
from edgefl_server.onnx_import import load_model
from edgefl_server.provisioning import ProvisioningError, open_fleet
from edgefl_server.store import StateError
from edgefl_server.strategies import STRATEGIES

log = logging.getLogger("edgefl_server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` (used by ``edgefl server``)."""
    conn = parser.add_argument_group("connection")
    env_option(conn, "--broker", env="EDGEFL_BROKER", metavar="URL",
               help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT; without it an embedded "
                    "broker is started on a free loopback port")
    env_option(conn, "--fleet", env="EDGEFL_FLEET", required=True, metavar="NAME",
               help="fleet name, shared with the devices")
    env_option(conn, "--server-id", env="EDGEFL_SERVER_ID", metavar="ID",
               help="fixed MQTT client id of the server (default edgefl-server-<fleet>)")
    env_option(conn, "--fleet-dir", env="EDGEFL_FLEET_DIR", metavar="DIR",
               help="the fleet directory `edgefl fleet init` made: the server's broker logins, "
                    "the CA, its signing and sealing keys")
    env_option(conn, "--insecure", env="EDGEFL_INSECURE", action="store_true",
               help="plain MQTT without signatures or sealed updates (test brokers only; anyone "
                    "who can publish on the broker can then steer the fleet)")
    env_option(conn, "--username", env="EDGEFL_USERNAME", help="broker user name (--insecure)")
    env_option(conn, "--password", env="EDGEFL_PASSWORD", help="broker password (--insecure)")
    env_option(conn, "--tls", env="EDGEFL_TLS", action="store_true", help="use TLS (--insecure)")
    env_option(conn, "--ca-certs", env="EDGEFL_CA_CERTS", metavar="FILE",
               help="CA bundle to verify the broker with (--insecure)")

    run = parser.add_argument_group("rounds")
    env_option(run, "--state-dir", env="EDGEFL_STATE_DIR", required=True, metavar="DIR",
               help="durable server state; reuse it to resume after a crash")
    env_option(run, "--model", env="EDGEFL_MODEL", metavar="SPEC",
               help="initial model of a new state dir (default mlp:64-32-10; a state dir "
                    "holding another model is refused): mlp:IN-HIDDEN...-CLASSES, your own "
                    "model as a plain .onnx file (imported: its trailing dense layers train), or "
                    "a model envelope (edgefl model import)")
    env_option(run, "--trainable-layers", env="EDGEFL_TRAINABLE_LAYERS", type=int, metavar="N",
               help="with an .onnx --model: how many trailing dense layers train (default all)")
    env_option(run, "--model-seed", env="EDGEFL_MODEL_SEED", type=int, default=0,
               help="seed of the initial mlp weights")
    env_option(run, "--strategy", env="EDGEFL_STRATEGY", default="fedavg",
               choices=sorted(STRATEGIES), help="aggregation strategy")
    parser.add_argument("--strategy-option", dest="strategy_options", action="append",
                        type=strategy_option, default=[], metavar="KEY=VALUE",
                        help="strategy hyperparameter, repeatable (e.g. eta=0.01, proximal_mu=0.1)")
    env_option(run, "--rounds", env="EDGEFL_ROUNDS", type=int, default=10, help="rounds to run")
    env_option(run, "--min-clients", env="EDGEFL_MIN_CLIENTS", type=int, default=1,
               help="devices that must be online before a round opens")
    env_option(run, "--clients-per-round", env="EDGEFL_CLIENTS_PER_ROUND", type=int,
               help="devices selected per round (default: every online device)")
    env_option(run, "--quorum", env="EDGEFL_QUORUM", type=int,
               help="updates that close a round at its deadline (default: --min-clients)")
    env_option(run, "--round-timeout", env="EDGEFL_ROUND_TIMEOUT", type=positive_float,
               default=60.0, metavar="S", help="seconds until a round's deadline")
    env_option(run, "--seed", env="EDGEFL_SEED", type=int, default=0,
               help="seed of client selection and random-k seeds")
    env_option(run, "--max-update-bytes", env="EDGEFL_MAX_UPDATE_BYTES", type=int,
               default=16 << 20, help="larger update payloads are dropped unread")
    env_option(run, "--max-update-norm", env="EDGEFL_MAX_UPDATE_NORM", type=positive_float,
               default=DEFAULT_MAX_UPDATE_NORM,
               help="clip every update to this L2 norm (bounds one device's pull on the model)")
    env_option(run, "--max-samples", env="EDGEFL_MAX_SAMPLES", type=int,
               default=DEFAULT_MAX_SAMPLES,
               help="cap on the sample count (FedAvg weight) one update may claim")
    env_option(run, "--evaluate", env="EDGEFL_EVALUATE", choices=["none", "digits"],
               default="none", help="report held-out accuracy of each model (digits task)")
    env_option(run, "--ingest-workers", env="EDGEFL_INGEST_WORKERS", type=int, default=1,
               metavar="N", help="ingestion processes: 1 (default) ingests in this process; N "
               ">= 2 starts N workers sharing the updates through an MQTT shared subscription "
               "(same results; at most 8 on a provisioned fleet; see docs/operations.md)")
    ops = parser.add_argument_group("operations")
    env_option(ops, "--metrics-port", env="EDGEFL_METRICS_PORT", type=port_number, metavar="PORT",
               help="serve Prometheus metrics on http://HOST:PORT/metrics until the process "
                    "exits (docs/operations.md)")
    env_option(ops, "--metrics-host", env="EDGEFL_METRICS_HOST", default="127.0.0.1",
               metavar="HOST", help="interface of the metrics endpoint (default 127.0.0.1; "
                                    "0.0.0.0 for a Prometheus on another machine)")
    env_option(ops, "--metrics-linger", env="EDGEFL_METRICS_LINGER", type=float, default=0.0,
               metavar="S", help="after the last round, keep serving metrics S seconds before "
                                 "exiting (longer than the scrape interval, so the final "
                                 "values are scraped)")
    buffered = parser.add_argument_group("buffered asynchronous aggregation (FedBuff)")
    env_option(buffered, "--buffer-size", env="EDGEFL_BUFFER_SIZE", type=int, metavar="K",
               help="instead of synchronous rounds, accept updates from any device at any time "
                    "and make a new model version from every K of them (--rounds counts "
                    "versions; no deadline, selection or quorum)")
    env_option(buffered, "--max-staleness", env="EDGEFL_MAX_STALENESS", type=int, default=4,
               metavar="S", help="with --buffer-size: accept updates trained on a version at "
                                 "most S versions old (scaled by 1/sqrt(1 + staleness)); older "
                                 "ones get a receipt saying they are too stale. S is announced: "
                                 "devices keep and resend an update as long as it can count")
    down = parser.add_argument_group("model refreshes (downlink compression)")
    env_option(down, "--downlink-density", env="EDGEFL_DOWNLINK_DENSITY", type=positive_float,
               metavar="D", help="also publish each new model as a refresh carrying this "
               "fraction of the coordinates, with error feedback (e.g. 0.05); the global model "
               "is then the sum of the refreshes; off by default (full envelopes only)")
    env_option(down, "--downlink-values", env="EDGEFL_DOWNLINK_VALUES", default="int8",
               choices=["f32", "f16", "int8", "ternary"], help="value encoding of refreshes")

    add_training_arguments(parser, "local training announced to devices", TrainingConfig())
    add_central_privacy_arguments(parser)
    add_logging_option(parser)


def main(argv) -> int:
    """``edgefl server ARGS``."""
    parser = argparse.ArgumentParser(prog="edgefl server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_central_privacy_arguments(parser) -> None:
    """The options of ``--privacy central`` (``edgefl server`` and ``edgefl simulate``)."""
    dp = parser.add_argument_group(
        "central differential privacy (--privacy central)",
        "User-level DP (McMahan et al. 2018): each round selects every device with probability "
        "--sampling-rate, devices clip in L2 to --clip, the server adds N(0, (z clip)^2) to the "
        "sum; the RDP accountant reports (epsilon, delta) for one device's whole data "
        "(add/remove) after every round. Give --noise-multiplier z, or --target-epsilon to "
        "calibrate z for --rounds; with a target the run stops before exceeding it. A resumed "
        "run keeps the privacy mode, --sampling-rate and z its rounds recorded (a restart "
        "that changes them is refused).")
    env_option(dp, "--sampling-rate", env="EDGEFL_SAMPLING_RATE", type=positive_float,
               default=None, metavar="Q",
               help="probability of selecting each eligible device in a round (Poisson)")
    env_option(dp, "--noise-multiplier", env="EDGEFL_NOISE_MULTIPLIER", type=positive_float,
               metavar="Z", help="noise standard deviation over the clip bound")
    env_option(dp, "--target-epsilon", env="EDGEFL_TARGET_EPSILON", type=positive_float,
               metavar="E", help="the run's total epsilon (user-level)")
    env_option(dp, "--target-delta", env="EDGEFL_TARGET_DELTA", type=positive_float,
               default=1e-5, metavar="D", help="the run's delta (default 1e-5)")
    env_option(dp, "--server-lr", env="EDGEFL_SERVER_LR", type=positive_float, default=1.0,
               help="DP-FedAvg's server learning rate on the noised mean update")


def central_privacy_from_args(args):
    """The :class:`~edgefl_server.accounting.CentralPrivacy` of ``--privacy central``, or None."""
    if args.privacy != "central":
        for name in ("sampling_rate", "noise_multiplier", "target_epsilon"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} belongs to --privacy central")
        return None
    if args.sampling_rate is None:
        raise ValueError("--privacy central needs --sampling-rate Q (each device's probability "
                         "of being selected in a round)")
    return CentralPrivacy(sampling_rate=args.sampling_rate, clip=args.clip,
                          noise_multiplier=args.noise_multiplier,
                          target_epsilon=args.target_epsilon, delta=args.target_delta,
                          server_lr=args.server_lr)


#: The model of a new state directory without --model.
DEFAULT_MODEL = "mlp:64-32-10"


def load_initial_model(spec: str, seed: int, trainable_layers: int | None = None):
    """The model of a new state directory: ``mlp:64-32-10``, an ``.onnx`` file or an envelope."""
    if spec.startswith("mlp:"):
        try:
            sizes = tuple(int(part) for part in spec[4:].split("-"))
        except ValueError:
            raise ValueError(f"--model {spec!r}: layer sizes must be integers, e.g. "
                             "mlp:64-32-10") from None
        if len(sizes) < 2:
            raise ValueError(f"--model {spec!r}: give at least input and class counts, e.g. mlp:64-10")
        return build_mlp(sizes, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--model {spec!r} is neither mlp:SIZES nor an existing model file")
    try:
        return load_model(path, trainable_layers=trainable_layers)
    except ValueError as exc:
        raise ValueError(f"--model {spec}: {exc}") from None


def config_from_args(args, broker_url: str):
    """The :class:`~edgefl_server.aggregator.ServerConfig` the options describe."""
    training = training_config_from_args(args)
    return ServerConfig(
        broker_url=broker_url, fleet=args.fleet, state_dir=args.state_dir,
        strategy=args.strategy, strategy_options=dict(args.strategy_options),
        rounds=args.rounds, min_clients=args.min_clients,
        clients_per_round=args.clients_per_round, quorum=args.quorum,
        round_timeout=args.round_timeout, training=training,
        central_privacy=central_privacy_from_args(args), metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, ingest_workers=args.ingest_workers,
        max_update_bytes=args.max_update_bytes, max_update_norm=args.max_update_norm,
        max_samples=args.max_samples, seed=args.seed, server_id=args.server_id,
        fleet_dir=args.fleet_dir, insecure=args.insecure, username=args.username,
        password=args.password, tls=args.tls or None, ca_certs=args.ca_certs,
        buffer=None if args.buffer_size is None else BufferConfig(
            buffer_size=args.buffer_size, max_staleness=args.max_staleness),
        downlink=None if args.downlink_density is None else DownlinkConfig(
            density=args.downlink_density, values=args.downlink_values),
    )


def run(args) -> int:
    """Run the server until every round is done (or SIGTERM/SIGINT); 0 on success, 2 on bad
    options or state, 1 if the broker cannot be reached."""
    setup_logging(args.log_level)
    # Installed first, so a SIGTERM during start-up also ends in a clean stop; restored after.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve(args, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args, stop: threading.Event) -> int:
    broker = None
    server = None
    try:
        # The model first: a file edgefl cannot use is reported before anything has started.
        initial_model = load_initial_model(args.model or DEFAULT_MODEL, args.model_seed,
                                           args.trainable_layers)
        if args.fleet_dir is None and not args.insecure:
            raise ValueError("give --fleet-dir DIR (create it with `edgefl fleet init`), or "
                             "--insecure for a plain test broker")
        if args.broker is None and args.insecure:
            broker = MosquittoBroker(persistence_dir=Path(args.state_dir) / "broker").start()
            log.info("no --broker given: started an embedded broker at %s; start devices with "
                     "--insecure --broker %s --fleet %s", broker.url, broker.url, args.fleet)
        elif args.broker is None:
            fleet = open_fleet(args.fleet_dir)
            broker = MosquittoBroker(fleet=fleet).start()
            log.info("no --broker given: started Mosquitto with the fleet's configuration at "
                     "%s; devices connect with `edgefl client --bundle DIR` from `edgefl fleet "
                     "add-device`", broker.url)
        config = config_from_args(args, args.broker or broker.url)
        server = AggregationServer(
            config, initial_model=initial_model, model_given=args.model is not None,
            evaluate=digits_evaluator(args.seed) if args.evaluate == "digits" else None)
        server.start(cancel=stop)
    except BaseException as exc:
        # Whatever ends start-up, the broker it started must not outlive it.
        if server is not None:
            server.close()
        if broker is not None:
            broker.stop()
        if isinstance(exc, BrokerUnreachable) and stop.is_set():
            log.info("stopped during start-up")
            return 0
        if isinstance(exc, (BrokerUnavailable, BrokerUnreachable)):
            print(f"edgefl server: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, (ValueError, StateError, ProvisioningError)):
            print(f"edgefl server: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            # A taken port, a state dir that cannot be one, a missing CA file: name the cause.
            named = exc.filename and str(exc.filename) in str(exc)
            where = f" ({exc.filename})" if exc.filename and not named else ""
            print(f"edgefl server: {exc}{where}", file=sys.stderr)
            return 2
        raise
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, server.metrics_port)
    try:
        while not stop.is_set() and not server.wait(0.2):
            pass
    finally:
        server.stop()  # the metrics endpoint stays up until close()
        if broker is not None:
            broker.stop()
    if server.wait(0):
        if len(server.history) >= config.rounds:
            log.info("all %d rounds done; final model version %d", config.rounds,
                     server.model.version)
        else:  # its privacy target ended it first
            log.info("the run is over after %d of %d rounds; final model version %d",
                     len(server.history), config.rounds, server.model.version)
        report = server.privacy_report()
        if report:
            log.info("privacy of the run: %s", report["summary"])
        if server.metrics_port is not None and args.metrics_linger > 0:
            log.info("serving the final metrics for %gs (--metrics-linger)", args.metrics_linger)
            stop.wait(args.metrics_linger)
    else:
        log.info("stopped; rerun with --state-dir %s to resume", config.state_dir)
    server.close()
    return 0
