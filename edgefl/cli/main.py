"""The ``edgefl`` command (also ``python -m edgefl``): ``client``, ``server``, ``simulate``,
``model``, ``bench``, ``fleet``.

Each subcommand lives in its own module of :mod:`edgefl.cli` and is imported only when it runs:
a device that runs ``edgefl client`` loads the device runtime and nothing of the server, the
simulation or their dependencies (onnx, scikit-learn, sqlite3).
"""
from __future__ import annotations

import argparse
import sys

from edgefl.cli.options import setup_logging


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
    # deferred for start-up time: `edgefl server/simulate/bench` never load the device runtime
    from edgefl.cli.client import add_client_arguments

    add_client_arguments(client)
    # The other subcommands parse their own options (see their --help), so that their modules are
    # imported only when used.
    commands.add_parser("server", help="run the aggregation server (edgefl server --help)", add_help=False)
    commands.add_parser("simulate", help="run a whole federation on one machine (edgefl simulate --help)",
                        add_help=False)
    commands.add_parser("model", help="import, inspect or export a model (edgefl model --help)",
                        add_help=False)
    commands.add_parser("bench", help="run the benchmarks: edgefl bench "
                                      "[kernels|federated|own-model] [--help]",
                        add_help=False)
    commands.add_parser("fleet", help="provision a fleet: edgefl fleet init|add-device|revoke "
                                      "(edgefl fleet --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command == "server":
        # deferred for start-up time: only `edgefl server` loads the server (onnx, sqlite3)
        from edgefl.cli import server

        return server.main(argv[1:])
    if command == "simulate":
        # deferred for start-up time: only `edgefl simulate` loads the simulation
        from edgefl.cli import simulate

        return simulate.main(argv[1:])
    if command == "model":
        # deferred for start-up time: only `edgefl model` loads the ONNX import (onnx)
        from edgefl.cli import model

        return model.main(argv[1:])
    if command == "fleet":
        # deferred for start-up time: only `edgefl fleet` loads provisioning (x509, PEM)
        from edgefl.cli import fleet

        return fleet.main(argv[1:])
    if command == "bench":
        # deferred for start-up time: only `edgefl bench` loads the benchmark runner
        from edgefl.cli import bench

        return bench.run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    # deferred for start-up time, as in build_parser (which has loaded it already)
    from edgefl.cli.client import run_client

    return run_client(args)
