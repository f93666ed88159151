"""A simulated device: ``edgefl client`` plus a steady prediction load whose latencies it records.

``python -m edgefl.simulation.device_process --predict-rate HZ <edgefl client options>`` is what
:class:`~edgefl.simulation.fleet.DeviceProcesses` starts for each device. The device itself is
exactly ``edgefl client`` (:func:`edgefl.cli.client.run_client`); the load
(:class:`~edgefl.simulation.load.PredictionLoad`) serves predictions on the device's own samples
and writes their latencies to ``STATE_DIR/predictions.npz`` and its counts to ``stats.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgefl.cli.client import add_client_arguments, run_client
from edgefl.cli.options import env_option, non_negative_float, setup_logging
from edgefl.simulation.load import PredictionLoad


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgefl.simulation.device_process",
                                     description=__doc__.splitlines()[0])
    add_client_arguments(parser)
    load = parser.add_argument_group("simulation load")
    env_option(load, "--predict-rate", env="EDGEFL_PREDICT_RATE", type=non_negative_float,
               default=0.0, metavar="HZ",
               help="serve this many predictions per second on local samples and record their "
                    "latency (0 = off)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    def prediction_load(client, X):
        return PredictionLoad(client, X, rate=args.predict_rate, seed=args.seed,
                              records_path=Path(args.state_dir) / "predictions.npz")

    return run_client(args, companion=prediction_load if args.predict_rate else None)


if __name__ == "__main__":
    sys.exit(main())
