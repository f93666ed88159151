"""A whole federation on one machine: broker, aggregation server and device processes on digits.

``edgefl simulate`` (and ``make demo``) runs the evaluation task of the design: scikit-learn's
digits split non-IID over N devices (Dirichlet alpha over labels), a 64-32-10 MLP, a held-out test
set. It starts a Mosquitto broker on a free loopback port (or uses ``--broker``), the aggregation
server in this process, and N real device processes (``python -m edgefl client``), each serving
predictions on its own samples at a fixed rate while it trains and swaps models. It prints a
progress line per round and ends with a summary against two baselines computed in the same run:

* **centralised**: the same model, same initial weights, trained on all training data in one
  place, one epoch per round;
* **dense FedAvg** (only when the run used compression or privacy): the same devices and rounds,
  in memory, with dense un-noised updates, aggregated by the server's own FedAvg.

It writes ``summary.json`` and ``accuracy.png`` into ``--out``. Every process it started is
stopped on Ctrl-C or on an error.

:class:`PredictionLoad` is the device side of the latency measurement.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgefl.protocol import CompressionConfig, TrainingConfig

log = logging.getLogger(__name__)

#: Phases a prediction is attributed to in :class:`PredictionLoad`.
IDLE, TRAINING, SWAP = 0, 1, 2
PHASES = {IDLE: "idle", TRAINING: "training", SWAP: "swap"}
#: A prediction that starts within this many seconds after a model swap counts as "during a swap"
#: (a new session's first runs and the swap's cache effects land there).
SWAP_WINDOW = 0.05


# -- the device side: a steady prediction load ---------------------------------------------------

class PredictionLoad:
    """Serve predictions on local samples at a fixed rate and record each one's latency.

    Each latency is the wall time of one :meth:`EdgeClient.predict` call on one sample, tagged
    with the phase the device was in when it started: ``training`` (a round's local training
    runs), ``swap`` (a model was installed within :data:`SWAP_WINDOW` seconds) or ``idle``.

    Parameters
    ----------
    client : EdgeClient
    X : numpy.ndarray
        Local samples to predict on, ``(m, input_width)``.
    rate : float
        Predictions per second; a late tick is skipped, not made up in a burst.
    seed : int
        Seed of the sample order.
    max_records : int
        Latencies kept (the first ones; the count goes on).
    """

    def __init__(self, client, X, *, rate: float, seed: int = 0, max_records: int = 1_000_000):
        if not rate > 0:
            raise ValueError(f"prediction rate must be positive, got {rate!r}")
        self.client = client
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        self.rate = float(rate)
        self._rng = np.random.default_rng(seed)
        self._latency = np.zeros(max_records, np.float32)
        self._phase = np.zeros(max_records, np.uint8)
        self._version = np.zeros(max_records, np.int64)
        self.count = 0
        self.unavailable = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PredictionLoad":
        self._thread = threading.Thread(target=self._loop, name="edgefl-prediction-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _phase_now(self, started: float) -> int:
        if self.client.training.is_set():
            return TRAINING
        swaps = self.client.swaps
        if swaps and started - swaps[-1][1] < SWAP_WINDOW:
            return SWAP
        return IDLE

    def _loop(self) -> None:
        period = 1.0 / self.rate
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                self._serve_one()
            except Exception:  # noqa: BLE001 - a failed prediction is counted, the load goes on
                self.errors += 1
                log.exception("prediction failed")
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay < 0:
                next_tick = time.monotonic()  # behind: skip the missed ticks
            else:
                self._stop.wait(delay)

    def _serve_one(self) -> None:
        predictor = self.client.predictor
        if predictor is None:  # before the first global model arrived
            self.unavailable += 1
            return
        x = self.X[self._rng.integers(len(self.X))]
        started = time.perf_counter()
        phase = self._phase_now(started)
        _, version = predictor.predict_with_version(x)
        elapsed = time.perf_counter() - started
        if self.client.training.is_set():
            phase = TRAINING  # training started during the call: it counts as training
        i = self.count
        if i < len(self._latency):
            self._latency[i], self._phase[i], self._version[i] = elapsed * 1e6, phase, version
        self.count += 1

    def records(self) -> dict[str, np.ndarray]:
        """The recorded ``latency_us``, ``phase`` and model ``version`` arrays."""
        n = min(self.count, len(self._latency))
        return {"latency_us": self._latency[:n].copy(), "phase": self._phase[:n].copy(),
                "version": self._version[:n].copy()}

    def stats(self) -> dict:
        """Counts and p50/p99 latency overall and per phase (microseconds)."""
        return {"predictions": self.count, "unavailable": self.unavailable,
                "prediction_errors": self.errors, **latency_summary(**self.records())}

    def save(self, path) -> None:
        """Write :meth:`records` to an ``.npz`` file (the simulation pools all devices' records)."""
        np.savez(path, **self.records())


def latency_summary(latency_us, phase, version=None) -> dict:
    """p50/p99 overall and per phase; None where there are no samples."""
    def pct(values):
        if len(values) == 0:
            return None, None
        p50, p99 = np.percentile(values, [50, 99])
        return round(float(p50), 2), round(float(p99), 2)

    out = {}
    out["p50_us"], out["p99_us"] = pct(latency_us)
    for code, name in PHASES.items():
        chosen = latency_us[phase == code]
        out[f"n_{name}"] = int(len(chosen))
        out[f"p50_us_{name}"], out[f"p99_us_{name}"] = pct(chosen)
    return out


# -- the orchestration ---------------------------------------------------------------------------

@dataclass
class SimulationPlan:
    """One simulated federation on the digits task."""

    devices: int = 10
    rounds: int = 30
    strategy: str = "fedavg"
    strategy_options: dict = field(default_factory=dict)
    training: object = None  # TrainingConfig; built by the caller
    seed: int = 0
    alpha: float = 0.5
    round_timeout: float = 30.0
    predict_rate: float = 50.0
    privacy_budget: float = 1000.0
    fleet: str = "sim"
    devices_as: str = "processes"  # or "threads" (in-process EdgeClients, for quick benchmarks)


class DeviceProcesses:
    """N ``edgefl client`` processes; :meth:`stop` ends every one of them (SIGTERM, then SIGKILL)."""

    def __init__(self, plan: SimulationPlan, broker_url: str, workdir: Path):
        self.plan, self.broker_url, self.workdir = plan, broker_url, workdir
        self.processes: list[subprocess.Popen] = []
        self.state_dirs: list[Path] = []

    def start(self) -> "DeviceProcesses":
        plan = self.plan
        for i in range(plan.devices):
            state = self.workdir / "devices" / f"dev-{i:02d}"
            state.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable, "-m", "edgefl", "client", "--broker", self.broker_url,
                "--fleet", plan.fleet, "--client-id", f"dev-{i:02d}", "--state-dir", str(state),
                "--dataset", "digits", "--partition", f"{i}/{plan.devices}",
                "--alpha", str(plan.alpha), "--seed", str(plan.seed),
                "--privacy-budget", str(plan.privacy_budget),
                "--predict-rate", str(plan.predict_rate), "--exit-when-finished",
                "--log-level", "INFO",
            ]
            with open(state / "device.log", "ab") as log_file:
                self.processes.append(subprocess.Popen(
                    command, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            self.state_dirs.append(state)
        return self

    def wait(self, timeout: float) -> bool:
        """Wait until every device exited by itself; True if all did in time."""
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def failed(self) -> list[int]:
        """Indices of devices that exited with an error."""
        return [i for i, p in enumerate(self.processes) if p.poll() not in (None, 0)]


class DeviceThreads:
    """N in-process :class:`EdgeClient` objects (threads), the quick variant for benchmarks."""

    def __init__(self, plan: SimulationPlan, broker_url: str, workdir: Path):
        self.plan, self.broker_url, self.workdir = plan, broker_url, workdir
        self.clients = []
        self.state_dirs: list[Path] = []

    def start(self) -> "DeviceThreads":
        from edgefl.client import EdgeClient
        from edgefl.datasets import dirichlet_partition, load_digits

        X_train, y_train, _, _ = load_digits(self.plan.seed)
        parts = dirichlet_partition(y_train, self.plan.devices, alpha=self.plan.alpha,
                                    seed=self.plan.seed)
        for i, part in enumerate(parts):
            state = self.workdir / "devices" / f"dev-{i:02d}"
            client = EdgeClient(f"dev-{i:02d}", self.plan.fleet, self.broker_url, state,
                                seed=self.plan.seed, privacy_budget=self.plan.privacy_budget)
            client.add_data(X_train[part], y_train[part])
            self.clients.append(client.start(timeout=30))
            self.state_dirs.append(state)
        return self

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(c.finished.wait(max(0.0, deadline - time.monotonic())) for c in self.clients)

    def stop(self) -> None:
        for client in self.clients:
            client.stop()
            client.write_stats()

    def failed(self) -> list[int]:
        return []


def wait_until_online(broker_url: str, fleet: str, count: int, timeout: float,
                      processes=None) -> None:
    """Block until ``count`` devices of ``fleet`` say "online" (retained status)."""
    from edgefl.protocol import DeviceStatus, ProtocolError, Topics
    from edgefl.transport import MqttConnection

    topics = Topics(fleet)
    online: set[str] = set()
    changed = threading.Event()

    def on_status(msg):
        client = topics.client_of(msg.topic)
        try:
            state = DeviceStatus.from_json(msg.payload).state if msg.payload else "offline"
        except ProtocolError:
            return
        (online.add if state == "online" else online.discard)(client)
        changed.set()

    watcher = MqttConnection(f"edgefl-sim-watch-{os.getpid()}", broker_url, session_expiry=0,
                             subscriptions=[(topics.all_status, 1)], on_message=on_status)
    with watcher:
        deadline = time.monotonic() + timeout
        while len(online) < count:
            if processes is not None and processes.failed():
                raise RuntimeError(f"device(s) {processes.failed()} exited early; see their "
                                   "device.log in the output directory")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(online)} of {count} devices came online within "
                                   f"{timeout:g} s")
            changed.wait(0.2)
            changed.clear()


class Progress:
    """One plain-text line per round: a bar, the round, accuracy and traffic."""

    def __init__(self, rounds: int, stream=sys.stdout, width: int = 30):
        self.rounds, self.stream, self.width = rounds, stream, width
        self.started = time.monotonic()

    def __call__(self, result) -> None:
        done = min(result.round_id, self.rounds)
        filled = round(self.width * done / self.rounds)
        accuracy = result.metrics.get("accuracy")
        shown = "  --  " if accuracy is None else f"{100 * accuracy:5.1f}%"
        self.stream.write(
            f"[{'#' * filled}{'.' * (self.width - filled)}] round {result.round_id:3d}/{self.rounds}"
            f"  accuracy {shown}  {result.accepted} update(s)  up {result.uplink_bytes / 1024:7.1f} KiB"
            f"  {time.monotonic() - self.started:6.1f} s\n")
        self.stream.flush()


def centralised_accuracy(plan: SimulationPlan, model, data) -> list[float]:
    """Accuracy after each of ``plan.rounds`` epochs of training the same model on all data."""
    from edgefl.model import mlp_logits
    from edgefl.trainer import LocalTrainer

    X_train, y_train, X_test, y_test = data
    trainer = LocalTrainer(model.manifest, capacity=len(y_train), seed=plan.seed)
    trainer.add(X_train, y_train)
    config = replace(plan.training, epochs=1, mu=0.0)
    weights = model.weights.copy()
    out = []
    for _ in range(plan.rounds):
        weights = weights + trainer.train(weights, config).delta
        out.append(float((mlp_logits(model.manifest, weights, X_test).argmax(1) == y_test).mean()))
    return out


def in_memory_accuracy(plan: SimulationPlan, model, data, *, strategy: str = "fedavg",
                       options: dict | None = None) -> list[float]:
    """Accuracy per round of dense, un-noised federated training of the same devices, in memory.

    Every device trains on its partition each round with ``plan.training`` (compression and
    privacy off, adjusted by the strategy as the server would) and the server's own strategy
    aggregates: the reference a run over MQTT with compression or privacy is compared to.
    """
    from edgefl.datasets import dirichlet_partition
    from edgefl.model import mlp_logits
    from edgefl.protocol import CompressionConfig, PrivacyConfig
    from edgefl.trainer import LocalTrainer
    from edgefl.wire import Update
    from edgefl_server.strategies import make_strategy

    X_train, y_train, X_test, y_test = data
    parts = dirichlet_partition(y_train, plan.devices, alpha=plan.alpha, seed=plan.seed)
    trainers = []
    for part in parts:
        trainer = LocalTrainer(model.manifest, capacity=len(part), seed=plan.seed)
        trainer.add(X_train[part], y_train[part])
        trainers.append(trainer)
    aggregator = make_strategy(strategy, options)
    config = aggregator.configure_training(
        replace(plan.training, privacy=PrivacyConfig(), compression=CompressionConfig()))
    weights, n = model.weights.copy(), model.manifest.num_params
    out = []
    for round_id in range(1, plan.rounds + 1):
        updates = []
        for i, trainer in enumerate(trainers):
            result = trainer.train(weights, config)
            updates.append(Update(f"dev-{i:02d}", round_id, round_id - 1, i, result.num_samples, n,
                                  None, result.delta))
        weights = aggregator.aggregate(weights, updates)
        out.append(float((mlp_logits(model.manifest, weights, X_test).argmax(1) == y_test).mean()))
    return out


def rounds_to(accuracies, target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches ``target``, or None."""
    return next((i + 1 for i, a in enumerate(accuracies) if a is not None and a >= target), None)


def run_federation(plan: SimulationPlan, broker_url: str, workdir: Path, *, on_round=None):
    """Run ``plan`` against the broker at ``broker_url``; return the server's history and the
    devices' stats and latency records. Stops everything it started, also on error or Ctrl-C."""
    from edgefl_server.app import AggregationServer, ServerConfig
    from edgefl_server.cli import digits_evaluator
    from edgefl_server.models import build_mlp

    workdir.mkdir(parents=True, exist_ok=True)
    devices = (DeviceProcesses if plan.devices_as == "processes" else DeviceThreads)(
        plan, broker_url, workdir)
    server = None
    try:
        devices.start()
        wait_until_online(broker_url, plan.fleet, plan.devices, timeout=60 + 3 * plan.devices,
                          processes=devices if plan.devices_as == "processes" else None)
        config = ServerConfig(
            broker_url=broker_url, fleet=plan.fleet, state_dir=workdir / "server",
            strategy=plan.strategy, strategy_options=plan.strategy_options, rounds=plan.rounds,
            min_clients=plan.devices, round_timeout=plan.round_timeout, training=plan.training,
            seed=plan.seed)
        server = AggregationServer(config, initial_model=build_mlp((64, 32, 10), seed=plan.seed),
                                   evaluate=digits_evaluator(plan.seed), on_round=on_round)
        history = server.run()
        final_version = server.model.version
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
    return history, final_version, stats, records


def summarize(plan: SimulationPlan, history, final_version, stats, records, *,
              centralised, dense_fedavg, num_params: int, wall_seconds: float) -> dict:
    """The run's summary (what ``summary.json`` holds)."""
    accuracy = [r.metrics.get("accuracy") for r in history]
    accepted = sum(r.accepted for r in history)
    uplink = sum(r.uplink_bytes for r in history)
    dense_update = 4 * num_params
    downlink = sum(s.get("bytes_down", 0) for s in stats)
    models = sum(s.get("models_installed", 0) for s in stats)
    pooled = {}
    if records:
        pooled = latency_summary(np.concatenate([r["latency_us"] for r in records]),
                                 np.concatenate([r["phase"] for r in records]))
    served_final = [s.get("client_id") for s in stats if s.get("model_version") == final_version]
    return {
        "plan": {**asdict(plan), "training": asdict(plan.training)},
        "wall_seconds": round(wall_seconds, 1),
        "rounds": [r.to_dict() for r in history],
        "accuracy": accuracy,
        "final_accuracy": accuracy[-1] if accuracy else None,
        "best_accuracy": max((a for a in accuracy if a is not None), default=None),
        "rounds_to_95": rounds_to(accuracy, 0.95),
        "centralised": {"accuracy": centralised, "final_accuracy": centralised[-1],
                        "epochs_to_95": rounds_to(centralised, 0.95)},
        "dense_fedavg": None if dense_fedavg is None else {
            "accuracy": dense_fedavg, "final_accuracy": dense_fedavg[-1],
            "rounds_to_95": rounds_to(dense_fedavg, 0.95)},
        "bytes": {
            "num_params": num_params,
            "uplink": uplink, "updates_accepted": accepted,
            "uplink_dense_float32": accepted * dense_update,
            "uplink_ratio_vs_dense": (accepted * dense_update / uplink) if uplink else None,
            "downlink_received_by_devices": downlink, "models_installed": models,
            "downlink_model_weights_float32": models * dense_update,
        },
        "predictions": {
            "served": sum(s.get("predictions", 0) for s in stats),
            "unavailable_before_first_model": sum(s.get("unavailable", 0) for s in stats),
            "errors": sum(s.get("prediction_errors", 0) for s in stats),
            **pooled,
        },
        "final_model_version": final_version,
        "devices_on_final_version": len(served_final),
        "devices": stats,
    }


def format_summary(summary: dict) -> str:
    """The human-readable end of ``edgefl simulate``."""
    def pct(x):
        return "  n/a" if x is None else f"{100 * x:5.1f}%"

    lines = ["", "accuracy per round (federated | centralised, same epochs"
             + (" | dense FedAvg)" if summary["dense_fedavg"] else ")")]
    central = summary["centralised"]["accuracy"]
    dense = summary["dense_fedavg"]["accuracy"] if summary["dense_fedavg"] else None
    for i, a in enumerate(summary["accuracy"]):
        row = f"  round {i + 1:3d}  {pct(a)} | {pct(central[i] if i < len(central) else None)}"
        if dense:
            row += f" | {pct(dense[i] if i < len(dense) else None)}"
        lines.append(row)
    b, p = summary["bytes"], summary["predictions"]
    lines += [
        "",
        f"final accuracy {pct(summary['final_accuracy'])} (best {pct(summary['best_accuracy'])}, "
        f"95% reached in round {summary['rounds_to_95'] or 'never'}); centralised "
        f"{pct(summary['centralised']['final_accuracy'])}"
        + (f"; dense FedAvg {pct(summary['dense_fedavg']['final_accuracy'])}" if dense else ""),
        f"uplink: {b['uplink'] / 1024:.1f} KiB for {b['updates_accepted']} updates; dense float32 "
        f"would be {b['uplink_dense_float32'] / 1024:.1f} KiB"
        + _ratio_text(b["uplink_ratio_vs_dense"]),
        f"downlink: devices received {b['downlink_received_by_devices'] / 1024:.1f} KiB "
        f"({b['models_installed']} model installs; their float32 weights alone are "
        f"{b['downlink_model_weights_float32'] / 1024:.1f} KiB, the rest is ONNX graphs, "
        f"announcements and receipts)",
        (f"predictions served by devices: {p['served']} (errors {p['errors']}); latency p50 "
         f"{p.get('p50_us')} us, p99 {p.get('p99_us')} us; p99 idle {p.get('p99_us_idle')} us, "
         f"during training {p.get('p99_us_training')} us ({p.get('n_training', 0)} predictions), "
         f"around swaps {p.get('p99_us_swap')} us ({p.get('n_swap', 0)} predictions)"
         + _sharing_note(summary)) if p["served"] else
        "predictions: none recorded (device threads, or --predict-rate 0)",
        f"{summary['devices_on_final_version']} of {len(summary['devices'])} devices ended on the "
        f"final model version {summary['final_model_version']}; {summary['wall_seconds']} s",
    ]
    return "\n".join(lines)


def _sharing_note(summary: dict) -> str:
    devices, cpus = summary["plan"]["devices"], os.cpu_count() or 1
    if summary["plan"]["devices_as"] != "processes" or devices < cpus:
        return ""
    return (f"\n  (here {devices} device processes and the server share {cpus} CPUs, so these "
            "latencies include waiting for a CPU; a real device has its CPU to itself)")


def _ratio_text(ratio: float | None) -> str:
    if not ratio:
        return ""
    if ratio >= 1:
        return f" ({ratio:.1f}x fewer bytes)"
    return f" ({1 / ratio:.3f}x more: the update header and checksum)"


def write_plot(summary: dict, path: Path) -> None:
    """Accuracy against rounds for the run and its baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = np.arange(1, len(summary["accuracy"]) + 1)
    plan = summary["plan"]
    training = plan["training"]
    label = f"{plan['strategy']}, {plan['devices']} devices"
    if training["compression"]["method"] != "none" or training["compression"]["values"] != "f32":
        label += f", {training['compression']['method']} {training['compression']['values']}"
    if training["privacy"]["mechanism"] != "none":
        label += f", {training['privacy']['mechanism']} eps {training['privacy']['epsilon']:g}"
    ax.plot(rounds, summary["accuracy"], marker="o", ms=3, label=f"federated ({label})")
    central = summary["centralised"]["accuracy"]
    ax.plot(np.arange(1, len(central) + 1), central, ls="--", label="centralised (epochs)")
    if summary["dense_fedavg"]:
        dense = summary["dense_fedavg"]["accuracy"]
        ax.plot(np.arange(1, len(dense) + 1), dense, ls=":", label="dense un-noised FedAvg")
    ax.axhline(0.95, color="grey", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("digits, 64-32-10 MLP, Dirichlet(%g) non-IID" % plan["alpha"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- edgefl simulate -----------------------------------------------------------------------------

#: What ``edgefl simulate`` announces unless told otherwise: a few local epochs with momentum, and
#: top-k 10% updates in f16 so that the byte comparison with dense float32 means something.
SIMULATION_TRAINING = TrainingConfig(
    epochs=5, batch_size=16, lr=0.1, momentum=0.9,
    compression=CompressionConfig("topk", density=0.1, values="f16"))


def add_arguments(parser) -> None:
    """The options of ``edgefl simulate``."""
    from edgefl.cli import add_training_arguments, env_option, non_negative_float, positive_float
    from edgefl_server.cli import strategy_option
    from edgefl_server.strategies import STRATEGIES

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
               help="Dirichlet concentration of the non-IID partition")
    env_option(run, "--round-timeout", env="EDGEFL_ROUND_TIMEOUT", type=positive_float,
               default=30.0, metavar="S", help="seconds until a round's deadline")
    env_option(run, "--broker", env="EDGEFL_BROKER", metavar="URL",
               help="use this broker instead of starting one (Mosquitto when installed, else an in-process broker)")
    env_option(run, "--out", env="EDGEFL_OUT", default="simulation-output", metavar="DIR",
               help="where summary.json, accuracy.png and every process's state and log go")
    env_option(run, "--predict-rate", env="EDGEFL_PREDICT_RATE", type=non_negative_float,
               default=50.0, metavar="HZ", help="predictions per second each device serves")
    env_option(run, "--threads", env="EDGEFL_THREADS", action="store_true",
               help="run devices as threads of this process instead of processes (quicker)")

    add_training_arguments(parser, "local training, compression, privacy", SIMULATION_TRAINING)
    train = parser.add_argument_group("device privacy budget")
    env_option(train, "--privacy-budget", env="EDGEFL_PRIVACY_BUDGET", type=positive_float,
               default=1000.0, metavar="EPSILON", help="each device's total epsilon")


def plan_from_args(args) -> SimulationPlan:
    from edgefl.cli import training_config_from_args

    if args.devices < 1 or args.rounds < 1:
        raise ValueError(f"--devices and --rounds must be at least 1, got {args.devices} and "
                         f"{args.rounds}")
    training = training_config_from_args(args)
    return SimulationPlan(
        devices=args.devices, rounds=args.rounds, strategy=args.strategy,
        strategy_options=dict(args.strategy_options), training=training, seed=args.seed,
        alpha=args.alpha, round_timeout=args.round_timeout, predict_rate=args.predict_rate,
        privacy_budget=args.privacy_budget, fleet=f"sim-{os.getpid()}",
        devices_as="threads" if args.threads else "processes")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    """``edgefl simulate``: 0 on success, 1 if the run failed, 2 for bad options."""
    from edgefl.datasets import load_digits
    from edgefl_server.broker import BrokerUnavailable, embedded_broker
    from edgefl_server.models import build_mlp

    try:
        plan = plan_from_args(args)
    except ValueError as exc:
        print(f"edgefl simulate: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each run starts fresh: a server state directory left by an earlier run would be resumed.
    for leftover in ("server", "devices", "broker"):
        shutil.rmtree(out / leftover, ignore_errors=True)
    broker = None
    started = time.monotonic()
    # Ctrl-C and SIGTERM both unwind through the cleanup below, so no process is left behind.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.broker is None:
            broker = embedded_broker(persistence_dir=out / "broker").start()
        url = args.broker or broker.url
        print(f"edgefl simulate: {plan.devices} devices ({plan.devices_as}), {plan.rounds} rounds "
              f"of {plan.strategy} on digits (Dirichlet {plan.alpha}), broker {url}, output in {out}",
              flush=True)
        history, final_version, stats, records = run_federation(
            plan, url, out, on_round=Progress(plan.rounds))
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
    data = load_digits(plan.seed)
    model = build_mlp((64, 32, 10), seed=plan.seed)
    centralised = centralised_accuracy(plan, model, data)
    lossy = plan.training.privacy.mechanism != "none" or plan.training.compression.method != "none" \
        or plan.training.compression.values != "f32"
    dense = in_memory_accuracy(plan, model, data) if lossy else None
    summary = summarize(plan, history, final_version, stats, records, centralised=centralised,
                        dense_fedavg=dense, num_params=model.manifest.num_params,
                        wall_seconds=wall)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plot(summary, out / "accuracy.png")
    print(format_summary(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'accuracy.png'}")
    return 0
