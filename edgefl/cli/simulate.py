"""``edgefl simulate``: a whole federation on one machine (see :mod:`edgefl.simulation.federation`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from edgefl.cli.options import (add_logging_option, add_training_arguments, env_option,
                                non_negative_float, positive_float, setup_logging,
                                strategy_option, training_config_from_args)
from edgefl.device.local_data import DataFileError
from edgefl.cli.server import add_central_privacy_arguments, central_privacy_from_args
from edgefl.simulation.baselines import centralised_accuracy, in_memory_accuracy
from edgefl.simulation.federation import provision, run_federation
from edgefl.simulation.plan import SIMULATION_TRAINING, SimulationPlan, partition_text
from edgefl.simulation.report import (INSECURE_RUN, SECURE_RUN, Progress, format_summary,
                                     summarize, write_plot)
from edgefl.simulation.task import TEST_FRACTION, make_task, partition_option
from edgefl_server.mosquitto import BrokerUnavailable, MosquittoBroker
from edgefl_server.strategies import STRATEGIES


def add_arguments(parser) -> None:
    """The options of ``edgefl simulate``."""
    run = parser.add_argument_group("federation")
    env_option(run, "--devices", env="EDGEFL_DEVICES", type=int, default=10,
               help="number of device processes")
    env_option(run, "--rounds", env="EDGEFL_ROUNDS", type=int, default=30, help="rounds to run")
    env_option(run, "--strategy", env="EDGEFL_STRATEGY", default="fedavg",
               choices=sorted(STRATEGIES), help="aggregation strategy")
    parser.add_argument("--strategy-option", dest="strategy_options", action="append",
                        type=strategy_option, default=[], metavar="KEY=VALUE",
                        help="strategy hyperparameter, repeatable (e.g. proximal_mu=0.01, eta=0.05)")
    env_option(run, "--seed", env="EDGEFL_SEED", type=int, default=0,
               help="seed of the data split, the partition, the model and the selection")
    env_option(run, "--alpha", env="EDGEFL_ALPHA", type=positive_float, default=0.5,
               help="Dirichlet concentration of the default partition (dirichlet:ALPHA)")
    own = parser.add_argument_group("your own model and data (instead of digits)")
    env_option(own, "--model", env="EDGEFL_MODEL", metavar="FILE",
               help="your model: a plain .onnx (imported; its trailing dense layers train) or a "
                    "model envelope")
    env_option(own, "--trainable-layers", env="EDGEFL_TRAINABLE_LAYERS", type=int, metavar="N",
               help="with an .onnx --model: how many trailing dense layers train")
    env_option(own, "--data", env="EDGEFL_DATA", metavar="FILE",
               help="your labelled samples: .npz (X, y), .csv or .parquet with a label column; "
                    f"{int(TEST_FRACTION * 100)}%% are held out for the accuracy")
    env_option(own, "--label-column", env="EDGEFL_LABEL_COLUMN", default="label",
               metavar="NAME", help="the label column of a .csv or .parquet --data file")
    env_option(own, "--partition", env="EDGEFL_PARTITION", type=partition_option,
               metavar="SPEC", help="how the training samples are split over devices: iid, "
                                    "dirichlet:ALPHA (default dirichlet:--alpha) or "
                                    "by-column:NAME (one device per value of that column)")
    env_option(run, "--round-timeout", env="EDGEFL_ROUND_TIMEOUT", type=positive_float,
               default=30.0, metavar="S", help="seconds until a round's deadline")
    env_option(run, "--insecure", env="EDGEFL_INSECURE", action="store_true",
               help="anonymous plain MQTT without signatures or sealed updates")
    env_option(run, "--broker", env="EDGEFL_BROKER", metavar="URL",
               help="with --insecure: use this broker instead of starting Mosquitto on a free "
                    "loopback port")
    env_option(run, "--out", env="EDGEFL_OUT", default="simulation-output", metavar="DIR",
               help="where summary.json, accuracy.png and every process's state and log go")
    env_option(run, "--predict-rate", env="EDGEFL_PREDICT_RATE", type=non_negative_float,
               default=50.0, metavar="HZ", help="predictions per second each device serves")
    env_option(run, "--threads", env="EDGEFL_THREADS", action="store_true",
               help="run devices as threads of this process instead of processes (quicker)")

    add_training_arguments(parser, "local training, compression, privacy", SIMULATION_TRAINING)
    add_central_privacy_arguments(parser)
    train = parser.add_argument_group("device privacy budget")
    env_option(train, "--privacy-budget", env="EDGEFL_PRIVACY_BUDGET", type=positive_float,
               default=1000.0, metavar="EPSILON",
               help="each device's total replace-one epsilon for local DP (basic composition)")


def plan_from_args(args) -> SimulationPlan:
    if args.devices < 1 or args.rounds < 1:
        raise ValueError(f"--devices and --rounds must be at least 1, got {args.devices} and "
                         f"{args.rounds}")
    training = training_config_from_args(args)
    return SimulationPlan(
        devices=args.devices, rounds=args.rounds, strategy=args.strategy,
        strategy_options=dict(args.strategy_options), training=training, seed=args.seed,
        alpha=args.alpha, round_timeout=args.round_timeout, predict_rate=args.predict_rate,
        privacy_budget=args.privacy_budget, central_privacy=central_privacy_from_args(args),
        fleet=f"sim-{os.getpid()}",
        devices_as="threads" if args.threads else "processes", partition=args.partition,
        model=args.model, data=args.data, label_column=args.label_column,
        trainable_layers=args.trainable_layers)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    """``edgefl simulate``: 0 on success, 1 if the run failed, 2 for bad options."""
    try:
        plan = plan_from_args(args)
        # The model and data first: what does not fit is reported before anything starts.
        task = make_task(plan)
        plan.devices = len(task.parts)  # by-column: one device per value of the column
        if args.broker is not None and not args.insecure:
            raise ValueError("--broker needs --insecure: a provisioned run starts Mosquitto with "
                             "the configuration it generates")
    except (ValueError, DataFileError) as exc:
        print(f"edgefl simulate: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each run starts fresh: a server state directory left by an earlier run would be resumed.
    for leftover in ("server", "devices", "broker", "data", "fleet"):
        shutil.rmtree(out / leftover, ignore_errors=True)
    broker = fleet = None
    started = time.monotonic()
    # Ctrl-C and SIGTERM both unwind through the cleanup below, so no process is left behind.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.insecure:
            logging.getLogger("edgefl").warning(
                "INSECURE: the simulated fleet runs without logins, TLS, signatures or sealed "
                "updates")
            if args.broker is None:
                broker = MosquittoBroker(persistence_dir=out / "broker").start()
        else:
            fleet = provision(plan, out / "fleet")
            broker = MosquittoBroker(fleet=fleet, any_port=True).start()
        url = args.broker or broker.url
        how = "INSECURE" if fleet is None else f"provisioned fleet in {out / 'fleet'}"
        print(f"edgefl simulate: {plan.devices} devices ({plan.devices_as}), {plan.rounds} "
              f"rounds of {plan.strategy} on {task.name} ({partition_text(plan.partition_spec)}),"
              f" broker {url} ({how}), output in {out}", flush=True)
        history, final_version, stats, records, privacy = run_federation(
            plan, url, out, task=task, fleet=fleet, on_round=Progress(plan.rounds))
    except (BrokerUnavailable, TimeoutError, RuntimeError) as exc:
        print(f"edgefl simulate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgefl simulate: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    finally:
        if broker is not None:
            broker.close()
    wall = time.monotonic() - started
    print("computing the baselines (centralised training; dense FedAvg if compressed or private)",
          flush=True)
    centralised = centralised_accuracy(plan, task)
    lossy = plan.training.privacy.mechanism != "none" or plan.central_privacy is not None \
        or plan.training.compression.method != "none" or plan.training.compression.values != "f32"
    dense = in_memory_accuracy(plan, task) if lossy else None
    summary = summarize(plan, history, final_version, stats, records, centralised=centralised,
                        dense_fedavg=dense, num_params=task.model.manifest.num_params,
                        wall_seconds=wall, task_name=task.name,
                        initial_accuracy=task.evaluator()(task.model)["accuracy"],
                        privacy=privacy,
                        security=SECURE_RUN if fleet is not None else INSECURE_RUN)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plot(summary, out / "accuracy.png")
    print(format_summary(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'accuracy.png'}")
    return 0


def main(argv) -> int:
    """``edgefl simulate ARGS``."""
    parser = argparse.ArgumentParser(prog="edgefl simulate",
                                     description="Run a whole federation on one machine: broker, "
                                                 "aggregation server and device processes, on "
                                                 "digits or on your own model and data.")
    add_arguments(parser)
    add_logging_option(parser)
    # The progress lines are the output; the components' INFO logs would drown them.
    parser.set_defaults(log_level=os.environ.get("EDGEFL_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return run(args)
