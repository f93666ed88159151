"""Federated accuracy on the digits task: strategies over a real broker, and the suites of issue 13.

``accuracy`` (the default suite): scikit-learn's digits, 20 devices, non-IID (Dirichlet 0.5 over
labels), the 64-32-10 MLP, held-out test set. Every strategy runs the full protocol over a private
Mosquitto (round announcements, model envelopes, encoded updates, receipts, durable server state),
with the devices as in-process :class:`edgefl.device.client.EdgeClient` threads to keep it quick. Each
run is compared with the same training done in memory with the server's own strategy (no MQTT):
the two curves should agree, so the transport loses nothing. Target (issue 4): dense FedAvg >= 95%
held-out accuracy within 50 rounds. Writes ``results/federated.json`` and ``.png``.

The other suites run the 85,002-parameter 64-256-256-10 MLP on 10 devices for 30 rounds (300
updates), in memory with the device's trainer and compressor and the server's strategies:

* ``poisoning``: FedAvg, FedMedian, FedTrimmedAvg and multi-Krum with 20% of the devices sending
  their honest delta x -10, dense, random-k 10% and top-k 10% (``results/federated_poisoning.*``);
* ``downlink``: downlink bytes and accuracy, full float32 envelopes against compressed model
  refreshes (``results/federated_downlink.*``);
* ``fedbuff``: FedBuff against synchronous FedAvg for the same number of accepted updates, with
  devices that go offline part of the time (``results/federated_fedbuff.*``).

Run: ``nice python benchmarks/bench_federated.py --suites accuracy,poisoning,downlink,fedbuff``
(``--rounds 5 --devices 5`` for a short smoke run).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from edgefl import kernels
from edgefl.device.compression import Compressor
from edgefl.device.trainer import LocalTrainer
from edgefl.simulation.baselines import in_memory_accuracy
from edgefl.simulation.datasets import dirichlet_partition, load_digits
from edgefl.simulation.federation import run_federation
from edgefl.simulation.plan import SimulationPlan
from edgefl.simulation.report import headless_pyplot, rounds_to
from edgefl.simulation.task import make_task
from edgefl.wire import Update, decode_model, decode_refresh, encode_model
from edgefl.wire.model import mlp_logits
from edgefl.wire.protocol import CompressionConfig, TrainingConfig
from edgefl_server.buffer import BufferConfig, scaled_by_staleness
from edgefl_server.downlink import DownlinkCompressor, DownlinkConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.mosquitto import MosquittoBroker
from edgefl_server.rounds import randomk_seed
from edgefl_server.strategies import make_strategy

HERE = Path(__file__).resolve().parent
TARGET = 0.95


def run_strategy(name: str, args) -> dict:
    plan = SimulationPlan(
        devices=args.devices, rounds=args.rounds, strategy=name, seed=args.seed, alpha=args.alpha,
        training=TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                momentum=args.momentum),
        round_timeout=60.0, predict_rate=0.0, fleet=f"bench-{name}", devices_as="threads")
    task = make_task(plan)  # digits, 64-32-10
    with tempfile.TemporaryDirectory(prefix=f"edgefl-bench-{name}-") as tmp:
        with MosquittoBroker(persistence_dir=Path(tmp) / "broker") as broker:
            started = time.perf_counter()
            history, final_version, stats, _, _ = run_federation(plan, broker.url, Path(tmp),
                                                                 task=task)
            wall = time.perf_counter() - started
    accuracy = [r.metrics["accuracy"] for r in history]
    reference = in_memory_accuracy(plan, task, strategy=name)
    aggregation_ms = sorted(1e3 * r.aggregation_seconds for r in history)
    result = {
        "strategy": name,
        "accuracy": accuracy,
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
        "rounds_to_95": rounds_to(accuracy, TARGET),
        "target_met": rounds_to(accuracy, TARGET) is not None,
        "in_memory_accuracy": reference,
        "in_memory_rounds_to_95": rounds_to(reference, TARGET),
        "max_abs_gap_to_in_memory": max(abs(a - b) for a, b in zip(accuracy, reference)),
        "updates_accepted": sum(r.accepted for r in history),
        "rejected": sum(sum(r.rejected.values()) for r in history),
        "uplink_bytes": sum(r.uplink_bytes for r in history),
        "aggregation_ms_median": aggregation_ms[len(aggregation_ms) // 2],
        "wall_seconds": round(wall, 1),
        "devices_on_final_version": sum(s.get("model_version") == final_version for s in stats),
    }
    print(f"{name:8s} final {100 * result['final_accuracy']:5.1f}%  best "
          f"{100 * result['best_accuracy']:5.1f}%  95% at round {result['rounds_to_95']}  "
          f"(in memory: {result['in_memory_rounds_to_95']}, max gap "
          f"{100 * result['max_abs_gap_to_in_memory']:.1f} pt)  {result['wall_seconds']} s",
          flush=True)
    return result


def chart(results, path: Path, args) -> None:
    plt = headless_pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        rounds = range(1, len(r["accuracy"]) + 1)
        line, = ax.plot(rounds, r["accuracy"], label=f"{r['strategy']} (MQTT)")
        ax.plot(rounds, r["in_memory_accuracy"], ls=":", color=line.get_color(),
                label=f"{r['strategy']} (in memory)")
    ax.axhline(TARGET, color="grey", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"digits, {args.devices} devices, Dirichlet({args.alpha}), 64-32-10 MLP")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- in-memory federations of the 85k-parameter model (robustness, downlink, FedBuff) ------------
#
# These suites run the device's own trainer and compressor and the server's own strategies and
# downlink compressor in one process, without a broker: what they compare (accuracy under
# poisoning, bytes of real encoded messages, schedules of asynchronous devices) does not depend
# on the transport, which the MQTT suite above and the integration tests cover.

BIG_LAYERS = (64, 256, 256, 10)


class MemoryFleet:
    """Devices of the digits task in memory: one trainer and one compressor per device."""

    def __init__(self, args, *, compression=None):
        self.model = build_mlp(BIG_LAYERS, seed=args.seed)
        self.num_params = self.model.manifest.num_params
        self.X_train, self.y_train, self.X_test, self.y_test = load_digits(args.seed)
        parts = dirichlet_partition(self.y_train, args.devices, alpha=args.alpha, seed=args.seed)
        self.trainers = []
        for part in parts:
            trainer = LocalTrainer(self.model.manifest, capacity=len(part), seed=args.seed)
            trainer.add(self.X_train[part], self.y_train[part])
            self.trainers.append(trainer)
        self.compression = compression or CompressionConfig()
        self.training = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size,
                                       lr=args.lr, momentum=args.momentum,
                                       compression=self.compression)
        self._compressors = {}

    def update(self, device: int, weights, round_id: int, base_version: int, *,
               poisoned: bool = False, randomk_seed: int = 0):
        """Device ``device``'s update from ``weights``, as it would send it.

        A poisoned device sends ``-10 *`` its honest delta, through the same compression. None
        when local training diverged (a device then sends nothing, as the real client does).
        """
        try:
            result = self.trainers[device].train(weights, self.training)
        except FloatingPointError:  # kernels.TrainingDiverged: the model was ruined upstream
            return None
        delta = result.delta
        if poisoned:  # as large as the value encoding can carry
            delta = np.clip(-10.0 * delta, -65504.0, 65504.0).astype(np.float32)
        compressor = self._compressors.get(device)
        if compressor is None:
            compressor = self._compressors[device] = Compressor(self.compression, self.num_params)
        try:
            indices, values = compressor.sparsify(delta, randomk_seed=randomk_seed)
        except ValueError:  # a ruined model's delta does not fit f16: the device sends nothing
            return None
        return Update(f"dev-{device:02d}", round_id, base_version, round_id, result.num_samples,
                      self.num_params, indices, values, compressor.value_encoding)

    def accuracy(self, weights) -> float:
        logits = mlp_logits(self.model.manifest, weights, self.X_test)
        return float((logits.argmax(1) == self.y_test).mean())


def _compressions():
    return {"dense": CompressionConfig(),
            "randomk 10% f16": CompressionConfig("randomk", density=0.1, values="f16"),
            "topk 10% f16": CompressionConfig("topk", density=0.1, values="f16")}


def run_poisoning(args) -> dict:
    """Each robust strategy against FedAvg with ``--poisoned`` of the devices sending their honest
    delta scaled by -10, dense and compressed; FedAvg without attackers as the reference."""

    poisoned = set(range(int(round(args.poisoned * args.devices))))
    strategies = [("fedavg", {}, False), ("fedavg", {}, True), ("fedmedian", {}, True),
                  ("fedtrimmedavg", {"beta": 0.2}, True),
                  # multi-Krum: plain Krum's single chosen update learns poorly on non-IID data
                  ("krum", {"num_malicious_clients": len(poisoned),
                            "num_clients_to_keep": args.devices - len(poisoned)}, True)]
    runs = []
    for label, compression in _compressions().items():
        for name, options, attacked in strategies:
            fleet = MemoryFleet(args, compression=compression)
            strategy = make_strategy(name, options)
            weights, curve = fleet.model.weights.copy(), []
            started = time.perf_counter()
            for round_id in range(1, args.rounds + 1):
                seed = randomk_seed(args.seed, round_id)
                updates = [fleet.update(d, weights, round_id, round_id - 1,
                                        poisoned=attacked and d in poisoned, randomk_seed=seed)
                           for d in range(args.devices)]
                updates = [u for u in updates if u is not None]
                new = strategy.aggregate(weights, updates) if updates else None
                if new is not None and np.isfinite(new).all():
                    weights = new
                curve.append(fleet.accuracy(weights))
            run = {"compression": label, "strategy": name, "options": options,
                   "poisoned_devices": len(poisoned) if attacked else 0, "accuracy": curve,
                   "final_accuracy": curve[-1],
                   "warning": strategy.compression_warning(compression),
                   "seconds": round(time.perf_counter() - started, 1)}
            runs.append(run)
            print(f"poisoning  {label:16s} {name:14s} {'attacked' if attacked else 'clean':8s} "
                  f"final {100 * curve[-1]:5.1f}%  ({run['seconds']} s)", flush=True)
    return {"poisoned_fraction": args.poisoned, "attack": "honest delta x -10", "runs": runs}


def chart_poisoning(result, path: Path, args) -> None:
    plt = headless_pyplot()

    labels = list(dict.fromkeys(r["compression"] for r in result["runs"]))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 4), sharey=True)
    for ax, label in zip(np.atleast_1d(axes), labels):
        for r in (r for r in result["runs"] if r["compression"] == label):
            tag = r["strategy"] + ("" if r["poisoned_devices"] else " (no attack)")
            ax.plot(range(1, len(r["accuracy"]) + 1), r["accuracy"], label=tag,
                    ls=":" if not r["poisoned_devices"] else "-")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("held-out accuracy")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{int(100 * args.poisoned)}% of {args.devices} devices poisoned (delta x -10), "
                 f"64-256-256-10 MLP", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



class Availability:
    """Which devices are online at each time step: a two-state Markov chain per device.

    A device online goes offline with probability ``p_leave`` per step, an offline one comes back
    with ``p_return``; devices train at their own pace (``1 + device % 3`` steps per local
    training) whether online or not, but only an online device can send.
    """
    def __init__(self, devices: int, seed: int, *, p_leave: float = 0.15, p_return: float = 0.25):
        self.rng = np.random.default_rng([seed, 0xA5A11])
        self.online = np.ones(devices, bool)
        self.p_leave, self.p_return = p_leave, p_return
        self.train_steps = [1 + d % 3 for d in range(devices)]

    def step(self) -> None:
        u = self.rng.random(self.online.size)
        self.online = np.where(self.online, u >= self.p_leave, u < self.p_return)


def run_sync_offline(args, fleet, total: int) -> dict:
    """Synchronous FedAvg rounds over devices that come and go: a round selects the devices
    online when it opens and closes when all of them answered or at its deadline; an answer
    after the deadline is late and rejected (the device trained for nothing)."""

    avail, strategy = Availability(args.devices, args.seed), make_strategy("fedavg")
    weights, t, accepted, late, round_id = fleet.model.weights.copy(), 0, 0, 0, 0
    curve = []
    while accepted < total:
        selected = [d for d in range(args.devices) if avail.online[d]]
        if not selected:
            avail.step()
            t += 1
            continue
        round_id += 1
        pending = {d: fleet.update(d, weights, round_id, round_id - 1) for d in selected}
        done_at = {d: avail.train_steps[d] for d in selected}
        updates, opened = [], t
        while pending and t - opened < args.deadline_steps:
            avail.step()
            t += 1
            for d in [d for d in pending if t - opened >= done_at[d] and avail.online[d]]:
                u = pending.pop(d)
                if u is not None and accepted + len(updates) < total:
                    updates.append(u)
        late += len(pending)
        new = strategy.aggregate(weights, updates) if updates else None
        if new is not None:
            weights = new
        accepted += len(updates)
        curve.append((accepted, t, fleet.accuracy(weights)))
    return {"mode": "sync fedavg", "accepted": accepted, "late_or_lost": late, "time_steps": t,
            "versions": sum(1 for _ in curve), "curve": curve, "final_accuracy": curve[-1][2]}


def run_fedbuff_offline(args, fleet, total: int) -> dict:
    """FedBuff over the same devices and availability: every device trains on the newest model
    it got, sends when online, the server accepts updates at most ``--max-staleness`` versions
    old (scaled by 1/sqrt(1 + staleness)) and aggregates every ``--buffer-size``."""

    config = BufferConfig(buffer_size=args.buffer_size, max_staleness=args.max_staleness)
    avail, strategy = Availability(args.devices, args.seed), make_strategy("fedavg")
    weights, version, t, accepted, stale = fleet.model.weights.copy(), 0, 0, 0, 0
    buffer, curve, staleness_seen = [], [], []
    working = {}  # device -> (update, steps left); None while it waits for a model
    for d in range(args.devices):
        working[d] = [fleet.update(d, weights, version + 1, version), avail.train_steps[d]]
    while accepted < total:
        avail.step()
        t += 1
        for d in range(args.devices):
            job = working[d]
            job[1] -= 1
            if job[1] > 0 or not avail.online[d]:
                continue  # still training, or finished and waiting to get online
            u = job[0]
            if u is not None and config.too_stale(u.base_version, version) is None:
                buffer.append(u)
                staleness_seen.append(version - u.base_version)
                accepted += 1
            elif u is not None:
                stale += 1
            if len(buffer) >= config.buffer_size or (buffer and accepted >= total):
                new = strategy.aggregate(weights, scaled_by_staleness(buffer, version))
                buffer = []
                if new is not None:
                    weights, version = new, version + 1
                curve.append((accepted, t, fleet.accuracy(weights)))
            # online now: it receives the newest model (a refresh) and trains again
            working[d] = [fleet.update(d, weights, version + 1, version), avail.train_steps[d]]
            if accepted >= total:
                break
    return {"mode": f"fedbuff K={config.buffer_size} S={config.max_staleness}",
            "accepted": accepted, "too_stale": stale, "time_steps": t, "versions": version,
            "mean_staleness": float(np.mean(staleness_seen)) if staleness_seen else 0.0,
            "curve": curve, "final_accuracy": curve[-1][2]}


def suite_fedbuff(args, out: Path) -> None:
    """FedBuff against synchronous FedAvg for the same number of accepted updates."""
    total = args.rounds * args.devices
    runs = []
    for run in (run_sync_offline, run_fedbuff_offline):
        started = time.perf_counter()
        result = run(args, MemoryFleet(args), total)
        result["seconds"] = round(time.perf_counter() - started, 1)
        runs.append(result)
        print(f"fedbuff    {result['mode']:22s} {result['accepted']} accepted in "
              f"{result['time_steps']} steps, {result['versions']} versions, final "
              f"{100 * result['final_accuracy']:5.1f}%  ({result['seconds']} s)", flush=True)
    _write(out, "federated_fedbuff", args,
           {"accepted_updates": total, "availability": "Markov chain per device: leave 0.15, "
            "return 0.25 per step; local training takes 1-3 steps", "runs": runs}, chart_fedbuff)


def chart_fedbuff(result, path: Path, args) -> None:
    plt = headless_pyplot()

    fig, (by_updates, by_time) = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for r in result["runs"]:
        accepted, steps, accuracy = zip(*r["curve"])
        by_updates.plot(accepted, accuracy, label=r["mode"])
        by_time.plot(steps, accuracy, label=r["mode"])
    by_updates.set_xlabel("accepted updates")
    by_time.set_xlabel("time steps (devices come and go)")
    by_updates.set_ylabel("held-out accuracy")
    for ax in (by_updates, by_time):
        ax.grid(alpha=0.3)
        ax.set_ylim(0.0, 1.0)
    by_time.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{args.devices} devices online part of the time, 64-256-256-10 MLP", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def run_downlink(args, downlink) -> dict:
    """FedAvg with top-k 10% f16 uplink; the model reaches the devices as full envelopes
    (``downlink`` None) or as refreshes, each decoded and applied (hash-checked) by a device."""
    fleet = MemoryFleet(args, compression=CompressionConfig("topk", density=0.1, values="f16"))
    strategy = make_strategy("fedavg")
    model = fleet.model
    compressor = None if downlink is None else DownlinkCompressor(downlink, fleet.num_params)
    device_weights = model.weights.copy()  # what a device following the refreshes holds
    curve, sizes = [], []
    for round_id in range(1, args.rounds + 1):
        updates = [u for u in (fleet.update(d, model.weights, round_id, model.version)
                               for d in range(args.devices)) if u is not None]
        target = strategy.aggregate(model.weights, updates)
        if compressor is None:
            model = model.with_weights(target, version=model.version + 1, round_id=round_id)
            payload = encode_model(model)
            device_weights = decode_model(payload).weights
        else:
            payload, model = compressor.refresh(model, target, round_id=round_id)
            device_weights = decode_refresh(payload).apply(device_weights)  # raises on drift
        sizes.append(len(payload))
        curve.append(fleet.accuracy(device_weights))
    label = "full f32 envelope" if downlink is None else \
        f"refresh top-{100 * downlink.density:g}% {downlink.values}"
    return {"downlink": label, "bytes_per_device_per_round": int(np.median(sizes)),
            "downlink_bytes": int(sum(sizes)) * args.devices, "accuracy": curve,
            "final_accuracy": curve[-1], "best_accuracy": max(curve),
            "device_equals_server": bool(device_weights.tobytes() == model.weights.tobytes())}


def suite_downlink(args, out: Path) -> None:
    """Downlink bytes and accuracy: full envelopes against compressed refreshes."""
    configs = [None, DownlinkConfig(density=0.1, values="int8"),
               DownlinkConfig(density=0.05, values="f16"),
               DownlinkConfig(density=0.05, values="int8"),
               DownlinkConfig(density=0.02, values="f16")]
    runs = []
    for downlink in configs:
        started = time.perf_counter()
        run = run_downlink(args, downlink)
        run["seconds"] = round(time.perf_counter() - started, 1)
        runs.append(run)
    full = runs[0]
    for run in runs:
        run["fewer_bytes_than_full"] = round(full["downlink_bytes"] / run["downlink_bytes"], 1)
        run["accuracy_loss_points"] = round(100 * (full["final_accuracy"] - run["final_accuracy"]), 2)
        print(f"downlink   {run['downlink']:24s} {run['bytes_per_device_per_round']:7d} B per "
              f"device and round ({run['fewer_bytes_than_full']}x fewer), final "
              f"{100 * run['final_accuracy']:5.1f}% ({run['accuracy_loss_points']:+.2f} pt "
              f"below full), device = server: {run['device_equals_server']}  "
              f"({run['seconds']} s)", flush=True)
    _write(out, "federated_downlink", args, {"uplink": "topk 10% f16, FedAvg", "runs": runs},
           chart_downlink)


def chart_downlink(result, path: Path, args) -> None:
    plt = headless_pyplot()
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in result["runs"]:
        curves.plot(range(1, len(r["accuracy"]) + 1), r["accuracy"], label=r["downlink"])
    curves.set_xlabel("round")
    curves.set_ylabel("held-out accuracy (device's model)")
    curves.set_ylim(0.5, 1.0)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7, loc="lower right")
    labels = [r["downlink"] for r in result["runs"]]
    bars.barh(labels, [r["downlink_bytes"] / 2**20 for r in result["runs"]])
    bars.set_xscale("log")
    bars.set_xlabel(f"downlink MiB, {args.devices} devices x {args.rounds} rounds (log)")
    bars.tick_params(axis="y", labelsize=7)
    fig.suptitle("model refreshes vs full envelopes, 64-256-256-10 MLP", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SUITES = ("accuracy", "poisoning", "downlink", "fedbuff")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="accuracy",
                        help=f"comma-separated, from {', '.join(SUITES)}")
    parser.add_argument("--strategies", default="fedavg,fedprox,fedadam",
                        help="comma-separated strategy names (accuracy suite)")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices (20 for the accuracy suite, 10 for the others)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (50 for the accuracy suite, 30 for the others)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--poisoned", type=float, default=0.2,
                        help="fraction of poisoned devices (poisoning suite)")
    parser.add_argument("--buffer-size", type=int, default=5, help="FedBuff K (fedbuff suite)")
    parser.add_argument("--max-staleness", type=int, default=4, help="FedBuff S (fedbuff suite)")
    parser.add_argument("--deadline-steps", type=int, default=4,
                        help="synchronous round deadline in time steps (fedbuff suite)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + PNG")
    args = parser.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}: choose from {', '.join(SUITES)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        suite_args = argparse.Namespace(**vars(args))
        big = suite != "accuracy"
        suite_args.devices = args.devices or (10 if big else 20)
        suite_args.rounds = args.rounds or (30 if big else 50)
        print(f"edgefl federated {suite}: backend {kernels.BACKEND}; {suite_args.devices} devices, "
              f"{suite_args.rounds} rounds, Dirichlet {args.alpha}; Python "
              f"{platform.python_version()}; load {_loadavg()}", flush=True)
        globals()[f"suite_{suite}"](suite_args, out)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("out", "suites")}


def _write(out: Path, stem: str, args, result: dict, chart_fn) -> None:
    summary = {"backend": kernels.BACKEND, "python": platform.python_version(),
               "loadavg_before": _loadavg(), "settings": _settings(args), **result}
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    chart_fn(result, out / f"{stem}.png", args)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}", flush=True)


def suite_accuracy(args, out: Path) -> None:
    results = [run_strategy(name, args) for name in args.strategies.split(",") if name]
    _write(out, "federated", args, {"target": TARGET, "results": results},
           lambda r, path, a: chart(r["results"], path, a))


def suite_poisoning(args, out: Path) -> None:
    _write(out, "federated_poisoning", args, run_poisoning(args), chart_poisoning)


if __name__ == "__main__":
    main()
