"""A whole federation on one machine: broker, aggregation server and device processes.

``edgefl simulate`` (and ``make demo``) runs the evaluation task of the design: scikit-learn's
digits split non-IID over N devices (Dirichlet alpha over labels), a 64-32-10 MLP, a held-out test
set; or, with ``--model FILE.onnx --data FILE``, the user's own model and data
(:mod:`~edgefl.simulation.task`), so that they go through the whole loop before deployment. It
provisions a fleet (:func:`provision`: ``edgefl fleet init`` and ``add-device`` for every device,
in ``--out``/fleet), starts Mosquitto with the fleet's generated configuration (TLS, per-device
logins, ACL) on a free loopback port, the aggregation server in this process (signing everything
it publishes, opening sealed updates), and N real device processes (``edgefl client --bundle``,
verifying and sealing), each serving predictions on its own samples at a fixed rate while it
trains and swaps models. ``--insecure`` runs the same over anonymous plain MQTT without
signatures or sealing (``--broker`` then uses a broker of your own). It prints a
progress line per round and ends with a summary against two baselines computed in the same run:

* **centralised**: the same model, same initial weights, trained on all training data in one
  place, one epoch per round;
* **dense FedAvg** (only when the run used compression or privacy): the same devices and rounds,
  in memory, with dense un-noised updates, aggregated by the server's own FedAvg.

It writes ``summary.json`` and ``accuracy.png`` into ``--out``. Every process it started is
stopped on Ctrl-C or on an error.

The parts: :mod:`~edgefl.simulation.plan`, :mod:`~edgefl.simulation.fleet` (the devices),
:mod:`~edgefl.simulation.load` (their prediction load), :mod:`~edgefl.simulation.baselines`,
:mod:`~edgefl.simulation.report`; ``edgefl simulate`` (:mod:`edgefl.cli.simulate`) parses the options.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgefl.simulation.fleet import DeviceProcesses, DeviceThreads, device_id, wait_until_online
from edgefl.simulation.plan import SimulationPlan
from edgefl.simulation.task import Task, make_task
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.mosquitto import free_port
from edgefl_server.provisioning import Fleet, add_device, init_fleet

log = logging.getLogger(__name__)


def provision(plan: SimulationPlan, directory: Path) -> Fleet:
    """A fleet for ``plan`` in ``directory`` (on a free loopback port), with a bundle per device."""
    fleet, _ = init_fleet(directory, plan.fleet, host="127.0.0.1", port=free_port())
    for i in range(plan.devices):
        add_device(fleet.directory, device_id(i))
    return fleet


def run_federation(plan: SimulationPlan, broker_url: str, workdir: Path, *,
                   task: Task | None = None, fleet: Fleet | None = None, on_round=None):
    """Run ``plan`` (on ``task``, by default :func:`~edgefl.simulation.task.make_task`'s)
    against the broker at ``broker_url``; return the server's history, the final model version,
    the devices' stats and latency records, and the server's privacy report. Stops everything it
    started, also on error or Ctrl-C.

    ``fleet``: the provisioned fleet (:func:`provision`) the broker runs; None runs insecure.
    """
    task = make_task(plan) if task is None else task
    devices_count = len(task.parts)
    workdir.mkdir(parents=True, exist_ok=True)
    devices = (DeviceProcesses if plan.devices_as == "processes" else DeviceThreads)(
        plan, broker_url, workdir, task, fleet)
    observer = None
    if fleet is not None:
        creds = fleet.observer_credentials()
        observer = dict(username=creds["username"], password=creds["password"],
                        ca_certs=str(fleet.ca_cert))
    server = None
    try:
        devices.start()
        wait_until_online(broker_url, plan.fleet, devices_count, timeout=60 + 3 * devices_count,
                          processes=devices if plan.devices_as == "processes" else None,
                          login=observer)
        config = ServerConfig(
            broker_url=broker_url, fleet=plan.fleet, state_dir=workdir / "server",
            strategy=plan.strategy, strategy_options=plan.strategy_options, rounds=plan.rounds,
            min_clients=devices_count, round_timeout=plan.round_timeout, training=plan.training,
            central_privacy=plan.central_privacy, seed=plan.seed,
            fleet_dir=None if fleet is None else fleet.directory, insecure=fleet is None)
        server = AggregationServer(config, initial_model=task.model, evaluate=task.evaluator(),
                                   on_round=on_round)
        history = server.run()
        final_version = server.model.version
        privacy = server.privacy_report()
        server = None
        if not devices.wait(timeout=60):
            log.warning("some devices did not finish within 60 s of the last round; stopping them")
    finally:
        if server is not None:
            server.stop()
        devices.stop()
    stats, records = [], []
    for state in devices.state_dirs:
        path = state / "stats.json"
        stats.append(json.loads(path.read_text()) if path.exists() else {"missing": str(state)})
        npz = state / "predictions.npz"
        if npz.exists():
            with np.load(npz) as r:
                records.append({k: r[k] for k in r.files})
    return history, final_version, stats, records, privacy

