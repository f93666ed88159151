"""The ``edgefl`` command (also ``python -m edgefl``): ``client``, ``server``, ``simulate``, ``bench``.

Every option can also come from an environment variable, named in its ``--help`` line (for
example ``EDGEFL_BROKER``), so a device's service file or container needs no arguments at all. A
command-line value wins over the environment.

Heavy or server-only modules are imported only by the subcommand that needs them: a device that
runs ``edgefl client`` never imports :mod:`edgefl_server`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("edgefl")

_TRUE = ("1", "true", "yes", "on")


def env_option(parser, *flags, env: str, help: str, default=None, required=False, **kwargs):
    """Add an option whose default comes from the environment variable ``env``.

    A string from the environment goes through the option's ``type`` like a command-line value,
    so a bad value gets argparse's usual error naming the option.
    """
    value = os.environ.get(env)
    if kwargs.get("action") == "store_true":
        default = value.strip().lower() in _TRUE if value is not None else bool(default)
    elif value is not None:
        default = value
    if required and default is None:
        kwargs["required"] = True
    parser.add_argument(*flags, default=default, help=f"{help} [env {env}]", **kwargs)


def add_logging_option(parser) -> None:
    env_option(parser, "--log-level", env="EDGEFL_LOG_LEVEL", default="INFO",
               choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def partition_spec(text: str) -> tuple[int, int]:
    """Parse ``I/N`` (this device holds part I of N, 0 <= I < N)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"partition {text!r} must look like I/N, e.g. 3/10") from None
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"partition {text!r} needs 0 <= I < N")
    return index, count


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or a positive number")
    return value


# -- the training a round announces (edgefl server, edgefl simulate) -----------------------------

def add_training_arguments(parser, title: str, defaults) -> None:
    """Options for the :class:`~edgefl.protocol.TrainingConfig` announced to devices.

    ``defaults`` is the TrainingConfig whose values the options default to, so each command
    chooses its own starting point without restating the options.
    """
    privacy, compression = defaults.privacy, defaults.compression
    train = parser.add_argument_group(title)
    env_option(train, "--epochs", env="EDGEFL_EPOCHS", type=int, default=defaults.epochs,
               help="local epochs")
    env_option(train, "--batch-size", env="EDGEFL_BATCH_SIZE", type=int,
               default=defaults.batch_size, help="local minibatch size")
    env_option(train, "--lr", env="EDGEFL_LR", type=positive_float, default=defaults.lr,
               help="local learning rate")
    env_option(train, "--momentum", env="EDGEFL_MOMENTUM", type=non_negative_float,
               default=defaults.momentum, help="local SGD momentum")
    env_option(train, "--weight-decay", env="EDGEFL_WEIGHT_DECAY", type=non_negative_float,
               default=defaults.weight_decay, help="local weight decay")
    env_option(train, "--privacy", env="EDGEFL_PRIVACY", choices=["none", "laplace", "gaussian"],
               default=privacy.mechanism, help="differential privacy mechanism on devices")
    env_option(train, "--epsilon", env="EDGEFL_EPSILON", type=positive_float,
               default=privacy.epsilon, help="privacy epsilon each device spends per round")
    env_option(train, "--delta", env="EDGEFL_DELTA", type=positive_float, default=privacy.delta,
               help="privacy delta (gaussian)")
    env_option(train, "--clip", env="EDGEFL_CLIP", type=positive_float, default=privacy.clip,
               help="clipping bound of an update (L1 for laplace, L2 for gaussian)")
    env_option(train, "--compression", env="EDGEFL_COMPRESSION",
               choices=["none", "topk", "threshold", "randomk"], default=compression.method,
               help="sparsification of updates (none: dense updates)")
    env_option(train, "--density", env="EDGEFL_DENSITY", type=positive_float,
               default=compression.density, help="fraction of coordinates kept by topk / randomk")
    env_option(train, "--tau", env="EDGEFL_TAU", type=non_negative_float, default=compression.tau,
               help="threshold of the threshold method")
    env_option(train, "--values", env="EDGEFL_VALUES", choices=["f32", "f16", "int8", "ternary"],
               default=compression.values, help="value encoding of updates")


def training_config_from_args(args):
    """The :class:`~edgefl.protocol.TrainingConfig` of :func:`add_training_arguments`' options."""
    from edgefl.protocol import TrainingConfig

    return TrainingConfig.from_dict({
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "momentum": args.momentum, "weight_decay": args.weight_decay,
        "privacy": {"mechanism": args.privacy, "epsilon": args.epsilon, "delta": args.delta,
                    "clip": args.clip},
        "compression": {"method": args.compression, "density": args.density, "tau": args.tau,
                        "values": args.values},
    })


# -- edgefl client -------------------------------------------------------------------------------

def add_client_arguments(parser) -> None:
    connection = parser.add_argument_group("connection")
    env_option(connection, "--broker", env="EDGEFL_BROKER", required=True, metavar="URL",
               help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT")
    env_option(connection, "--fleet", env="EDGEFL_FLEET", required=True, metavar="NAME",
               help="fleet name, shared with the aggregation server")
    env_option(connection, "--client-id", env="EDGEFL_CLIENT_ID", required=True, metavar="ID",
               help="this device's fixed id (1-64 characters from A-Z a-z 0-9 _ . -)")
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
    env_option(state, "--privacy-budget", env="EDGEFL_PRIVACY_BUDGET", type=positive_float,
               default=100.0, metavar="EPSILON",
               help="total epsilon this device will ever spend; it sends nothing once spent")
    env_option(state, "--privacy-file", env="EDGEFL_PRIVACY_FILE", metavar="FILE",
               help="where the spent epsilon is kept (default STATE_DIR/privacy.json); put it "
               "where a new state directory does not reset it")
    env_option(state, "--require-privacy", env="EDGEFL_REQUIRE_PRIVACY", action="store_true",
               help="skip every round the server announces without differential privacy, so "
               "this device never sends a clean update")
    env_option(state, "--capacity", env="EDGEFL_CAPACITY", type=int, default=100_000,
               metavar="N", help="most local training samples kept (the oldest are dropped)")

    data = parser.add_argument_group("data (one source)")
    env_option(data, "--data", env="EDGEFL_DATA", metavar="FILE.npz",
               help="local training data: an .npz file with arrays X (samples x features) and y")
    env_option(data, "--dataset", env="EDGEFL_DATASET", choices=["digits"],
               help="simulation: a part of a built-in dataset instead of --data")
    env_option(data, "--partition", env="EDGEFL_PARTITION", type=partition_spec, metavar="I/N",
               help="simulation: this device holds non-IID part I of N (Dirichlet over labels)")
    env_option(data, "--alpha", env="EDGEFL_ALPHA", type=positive_float, default=0.5,
               help="simulation: Dirichlet concentration of the partition (smaller = less IID)")
    env_option(data, "--seed", env="EDGEFL_SEED", type=int, default=0,
               help="seed of the dataset split, the partition and local training")

    serve = parser.add_argument_group("simulation load")
    env_option(serve, "--predict-rate", env="EDGEFL_PREDICT_RATE", type=non_negative_float,
               default=0.0, metavar="HZ",
               help="serve this many predictions per second on local samples and record their "
                    "latency (0 = off)")
    env_option(serve, "--exit-when-finished", env="EDGEFL_EXIT_WHEN_FINISHED", action="store_true",
               help="exit once the server announces the last round is over and the final model "
                    "is live; the device's stats are written to STATE_DIR/stats.json")
    add_logging_option(parser)


def load_client_data(args):
    """The device's local training data ``(X, y)`` from ``--data`` or ``--dataset``."""
    import numpy as np

    if (args.data is None) == (args.dataset is None):
        raise SystemExit("edgefl client: give exactly one data source, --data FILE.npz or "
                         "--dataset digits --partition I/N")
    if args.data is not None:
        try:
            with np.load(args.data, allow_pickle=False) as arrays:
                missing = {"X", "y"} - set(arrays.files)
                if missing:
                    raise SystemExit(f"edgefl client: {args.data} has arrays {sorted(arrays.files)}, "
                                     f"missing {sorted(missing)}; save it with np.savez(path, X=..., y=...)")
                return np.ascontiguousarray(arrays["X"], np.float32), np.asarray(arrays["y"])
        except (OSError, ValueError) as exc:
            raise SystemExit(f"edgefl client: cannot read {args.data}: {exc}") from None
    if args.partition is None:
        raise SystemExit("edgefl client: --dataset needs --partition I/N (which part this device holds)")
    from edgefl.datasets import dirichlet_partition, load_digits

    index, count = args.partition
    X_train, y_train, _, _ = load_digits(args.seed)
    part = dirichlet_partition(y_train, count, alpha=args.alpha, seed=args.seed)[index]
    return X_train[part], y_train[part]


def run_client(args) -> int:
    import signal
    import threading

    from edgefl.client import EdgeClient
    from edgefl.simulation import PredictionLoad
    from edgefl.transport import BrokerUnreachable

    X, y = load_client_data(args)
    client = EdgeClient(
        args.client_id, args.fleet, args.broker, args.state_dir,
        username=args.username, password=args.password, tls=args.tls or None,
        ca_certs=args.ca_certs, privacy_budget=args.privacy_budget,
        privacy_file=args.privacy_file, require_privacy=args.require_privacy,
        capacity=args.capacity,
        seed=args.seed,
    )
    client.add_data(X, y)
    load = PredictionLoad(client, X, rate=args.predict_rate, seed=args.seed) if args.predict_rate else None
    # SIGTERM (a service manager, the simulation) stops the device as cleanly as Ctrl-C does.
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    try:
        client.start(timeout=args.connect_timeout)
    except BrokerUnreachable as exc:
        log.error("%s", exc)
        return 2
    if load is not None:
        load.start()
    try:
        while not terminated.is_set():
            if args.exit_when_finished and client.finished.is_set():
                break
            terminated.wait(0.2)
    except KeyboardInterrupt:
        log.info("interrupted: stopping")
    finally:
        if load is not None:
            load.stop()
            load.save(Path(args.state_dir) / "predictions.npz")
        client.stop()
        client.write_stats(extra=load.stats() if load is not None else None)
    return 0


# -- edgefl server / simulate / bench ------------------------------------------------------------

def run_server(argv) -> int:
    # Imported here: a device installs edgefl without the server's dependencies.
    from edgefl_server import cli as server_cli

    parser = argparse.ArgumentParser(prog="edgefl server", description=server_cli.__doc__.splitlines()[0])
    server_cli.add_arguments(parser)
    return server_cli.run(parser.parse_args(argv))


def run_simulate(argv) -> int:
    from edgefl import simulation

    parser = argparse.ArgumentParser(prog="edgefl simulate", description=simulation.__doc__.splitlines()[0])
    simulation.add_arguments(parser)
    add_logging_option(parser)
    # The progress lines are the output; the components' INFO logs would drown them.
    parser.set_defaults(log_level=os.environ.get("EDGEFL_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return simulation.run(args)


BENCHMARKS = {"kernels": "bench_kernels.py", "federated": "bench_federated.py"}


def run_bench(argv, benchmarks_dir: Path | None = None) -> int:
    """Run a benchmark script of the source checkout (``benchmarks/`` next to the package)."""
    suite = "kernels"
    if argv and argv[0] in BENCHMARKS:
        suite, argv = argv[0], argv[1:]
    if benchmarks_dir is None:
        benchmarks_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    script = benchmarks_dir / BENCHMARKS[suite]
    if not script.is_file():
        print(
            f"edgefl bench: the benchmarks ship with edgefl's source, not with the installed "
            f"package; in a source checkout run `edgefl bench {suite}` or "
            f"`python benchmarks/{BENCHMARKS[suite]}`",
            file=sys.stderr,
        )
        return 2
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"edgefl_bench_{suite}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))  # the benchmarks import their shared harness
    spec.loader.exec_module(module)
    sys.argv[0] = f"edgefl bench {suite}"  # argparse names the program in usage lines after it
    return module.main(argv) or 0


# -- entry point ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefl",
        description="Federated learning for edge devices: live ONNX predictions, on-device "
                    "training, private compact updates over MQTT.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    client = commands.add_parser("client", help="run a device: serve, train, send updates",
                                 description="Run a device: serve predictions from the current "
                                             "global model, train on local data, send updates.")
    add_client_arguments(client)
    # The other subcommands parse their own options (see their --help), so that their modules are
    # imported only when used.
    commands.add_parser("server", help="run the aggregation server (edgefl server --help)", add_help=False)
    commands.add_parser("simulate", help="run a whole federation on one machine (edgefl simulate --help)",
                        add_help=False)
    commands.add_parser("bench", help="run the benchmarks: edgefl bench [kernels|federated] [--help]",
                        add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = {"server": run_server, "simulate": run_simulate, "bench": run_bench}
    if argv and argv[0] in delegated:
        return delegated[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return run_client(args)
