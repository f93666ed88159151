"""Held-out accuracy against total epsilon: no DP, local Laplace, central DP (DP-FedAvg).

Two tasks, the 64-32-10 MLP on both, non-IID splits (Dirichlet 0.5 over labels):

* ``digits``: scikit-learn's digits over 20 devices (the design's evaluation task);
* ``synthetic``: :func:`edgefl.simulation.datasets.load_synthetic` (``make_classification``, 10
  classes of two clusters, 64 features; 60,000 training samples) over 1,000 devices, about 60
  samples each.

Each run is a :class:`edgefl.memory_fleet.MemoryFleet`: the devices' update pipeline and the
server's selection, strategy and accountant, in memory (``tests/test_memory_fleet.py`` checks it
against a run over Mosquitto). Every round selects each device with probability ``q`` (Poisson).

* **no DP**: FedAvg, sample-weighted.
* **central DP**: DP-FedAvg; devices clip in L2 to ``C``, the server adds N(0, (z C)^2) to the sum
  and divides by ``q N``; ``z`` is calibrated (RDP accountant) so that the run's rounds reach the
  target epsilon exactly: user-level (one device's whole data), add/remove adjacency, delta 1e-5.
  Also **clipped, no noise** (z = 0): what clipping alone costs.
* **local Laplace**: devices clip in L1 and add Laplace of scale 2C / epsilon_round (replace-one);
  each device's budget is the target total epsilon (basic composition over the rounds it takes
  part in; it stops sending once spent), and epsilon_round = total / ceil(qR + 3 sqrt(qR(1 - q)))
  (its expected participations qR over R rounds plus three standard deviations).
  Its epsilon is replace-one, delta 0.

Writes ``benchmarks/results/privacy.json`` and ``benchmarks/results/privacy.png``.

Run: ``nice python benchmarks/bench_privacy.py`` (``--quick`` for a smoke run of a few rounds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefl.simulation.datasets import dirichlet_partition, load_digits, load_synthetic
from edgefl.simulation.memory_fleet import MemoryFleet, central_training
from edgefl.simulation.report import headless_pyplot
from edgefl.wire.model import mlp_logits
from edgefl.wire.protocol import PrivacyConfig, TrainingConfig
from edgefl_server.accounting import RunAccountant, noise_multiplier_for
from edgefl_server.model_builder import build_mlp
from edgefl_server.strategies import DPFedAvg, FedAvg

HERE = Path(__file__).resolve().parent
DELTA = 1e-5
EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class Task:
    name: str
    devices: int
    sampling_rate: float
    rounds: int
    epochs: int
    lr: float
    clip: float  # L2 clip of central DP
    server_lr: float  # DP-FedAvg's server learning rate
    laplace_clip: float  # L1 clip of local Laplace


TASKS = {
    "digits": Task("digits", devices=20, sampling_rate=0.5, rounds=30, epochs=3, lr=0.1,
                   clip=1.0, server_lr=3.0, laplace_clip=1.0),
    "synthetic": Task("synthetic", devices=1000, sampling_rate=0.2, rounds=100, epochs=3,
                      lr=0.2, clip=1.0, server_lr=3.0, laplace_clip=1.0),
}


def load(task: Task, seed: int):
    X, y, X_test, y_test = (load_digits if task.name == "digits" else load_synthetic)(seed)
    parts = dirichlet_partition(y, task.devices, alpha=0.5, seed=seed)
    return [(X[p], y[p]) for p in parts], X_test, y_test


def run(task: Task, mode: str, epsilon: float | None, data, seed: int) -> dict:
    device_data, X_test, y_test = data
    model = build_mlp((64, 32, 10), seed=seed)
    training = TrainingConfig(epochs=task.epochs, batch_size=16, lr=task.lr)
    q, rounds = task.sampling_rate, task.rounds
    extra, kwargs = {}, {}
    if mode == "none":
        strategy = FedAvg()
    elif mode in ("central", "clip-only"):
        z = 0.0 if mode == "clip-only" else noise_multiplier_for(epsilon, DELTA, q, rounds)
        strategy = DPFedAvg(clip=task.clip, noise_multiplier=z, server_lr=task.server_lr,
                            noise_seed=seed)
        training = central_training(training, task.clip)
        if z > 0:
            kwargs["accountant"] = RunAccountant(noise_multiplier=z, sampling_rate=q,
                                                 delta=DELTA, target_epsilon=epsilon)
        extra = {"noise_multiplier": z, "clip_l2": task.clip, "server_lr": task.server_lr,
                 "noise_std_of_mean_per_coordinate": z * task.clip / (q * task.devices)}
    else:  # local Laplace, each device's budget = the total epsilon
        expected = q * rounds
        per_round = epsilon / math.ceil(expected + 3 * math.sqrt(expected * (1 - q)))
        strategy = FedAvg()
        training = TrainingConfig(epochs=task.epochs, batch_size=16, lr=task.lr,
                                  privacy=PrivacyConfig("laplace", epsilon=per_round,
                                                        clip=task.laplace_clip))
        kwargs["privacy_budget"] = epsilon
        extra = {"epsilon_per_round": per_round, "clip_l1": task.laplace_clip,
                 "laplace_scale": 2 * task.laplace_clip / per_round}
    fleet = MemoryFleet(model, device_data, strategy=strategy, training=training,
                        sampling_rate=q, seed=seed, **kwargs)
    started = time.process_time()
    history = fleet.run(rounds, lambda w: (mlp_logits(model.manifest, w, X_test).argmax(1)
                                           == y_test).mean())
    return {
        "mode": mode, "target_epsilon": epsilon, "rounds_run": len(history.accuracy),
        "final_accuracy": history.accuracy[-1], "accuracy": history.accuracy,
        "epsilon": history.epsilon, "final_epsilon": history.epsilon[-1],
        "adjacency": {"none": None, "clip-only": None, "central": "add/remove one device",
                      "local": "replace-one (each device's data)"}[mode],
        "delta": DELTA if mode == "central" else 0.0,
        "mean_participants": sum(history.participants) / len(history.participants),
        "stopped": history.stopped, "cpu_seconds": round(time.process_time() - started, 1),
        **extra,
    }


def plot(results: dict, path: Path) -> None:
    plt = headless_pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5.0), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        task = r["task"]
        for mode, style in (("central", "o-"), ("local", "s--")):
            runs = [x for x in r["runs"] if x["mode"] == mode]
            ax.plot([x["target_epsilon"] for x in runs], [x["final_accuracy"] for x in runs],
                    style, label={"central": "central DP (DP-FedAvg), add/remove, delta 1e-5",
                                  "local": "local Laplace, replace-one, delta 0"}[mode])
        for mode, color in (("none", "black"), ("clip-only", "grey")):
            acc = next(x["final_accuracy"] for x in r["runs"] if x["mode"] == mode)
            name = "no DP" if mode == "none" else "clipped, no noise"
            ax.axhline(acc, color=color, ls=":", label=f"{name} ({100 * acc:.1f}%)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total epsilon per device (user-level)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: {task['devices']} devices, q = {task['sampling_rate']}, "
                     f"{task['rounds']} rounds")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="5 rounds, two epsilons: a smoke run")
    parser.add_argument("--out", default=None,
                        help="where the JSON and PNG go (default benchmarks/results, or a "
                             "temporary directory with --quick)")
    args = parser.parse_args(argv)
    out = Path(args.out or (tempfile.mkdtemp(prefix="edgefl-bench-privacy-") if args.quick
                            else HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    epsilons = (2.0, 8.0) if args.quick else EPSILONS
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    results = {}
    for name in args.tasks:
        task = TASKS[name]
        if args.quick:
            task = Task(**{**asdict(task), "rounds": 5})
        data = load(task, args.seed)
        runs = [run(task, mode, None, data, args.seed) for mode in ("none", "clip-only")]
        for epsilon in epsilons:
            for mode in ("central", "local"):
                runs.append(run(task, mode, epsilon, data, args.seed))
                r = runs[-1]
                print(f"{name:9s} {mode:8s} epsilon {epsilon:5g}: accuracy "
                      f"{100 * r['final_accuracy']:5.1f}% after {r['rounds_run']} rounds "
                      f"(epsilon spent {r['final_epsilon']:.3g}; {r['cpu_seconds']} s CPU)",
                      flush=True)
        base = runs[0]["final_accuracy"]
        print(f"{name:9s} no DP {100 * base:.1f}%, clipped without noise "
              f"{100 * runs[1]['final_accuracy']:.1f}%", flush=True)
        results[name] = {"task": asdict(task), "runs": runs}
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    report = {
        "benchmark": "privacy", "delta": DELTA, "results": results,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
    }
    synthetic = results.get("synthetic")
    if synthetic:
        base = next(x["final_accuracy"] for x in synthetic["runs"] if x["mode"] == "none")
        at8 = next((x for x in synthetic["runs"] if x["mode"] == "central"
                    and x["target_epsilon"] == 8.0), None)
        if at8 is not None:
            report["target"] = {
                "what": "central DP on >= 1,000 devices within 5 points of no DP at epsilon <= 8, "
                        "delta <= 1e-5",
                "no_dp": base, "central_dp_epsilon_8": at8["final_accuracy"],
                "gap_points": round(100 * (base - at8["final_accuracy"]), 2),
                "met": base - at8["final_accuracy"] <= 0.05 and at8["final_epsilon"] <= 8.0}
            print(f"target: {report['target']}")
    (out / "privacy.json").write_text(json.dumps(report, indent=1))
    plot(results, out / "privacy.png")
    print(f"wrote {out / 'privacy.json'} and {out / 'privacy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
