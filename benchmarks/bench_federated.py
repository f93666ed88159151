"""Federated accuracy on the digits task over a real broker: FedAvg, FedProx, FedAdam.

The evaluation task of the design: scikit-learn's digits, 20 devices, non-IID (Dirichlet 0.5 over
labels), the 64-32-10 MLP, held-out test set. Every strategy runs the full protocol over a private
Mosquitto (round announcements, model envelopes, encoded updates, receipts, durable server state),
with the devices as in-process :class:`edgefl.device.client.EdgeClient` threads to keep it quick. Each
run is compared with the same training done in memory with the server's own strategy (no MQTT):
the two curves should agree, so the transport loses nothing.

Target (issue 4): dense FedAvg >= 95% held-out accuracy within 50 rounds; the same is reported for
FedProx and FedAdam (the strategies' default hyperparameters).

Writes ``benchmarks/results/federated.json`` and ``benchmarks/results/federated.png``.

Run: ``python benchmarks/bench_federated.py`` (``--rounds 5 --devices 5`` for a short smoke run).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from edgefl import kernels
from edgefl.simulation.baselines import in_memory_accuracy
from edgefl.simulation.datasets import load_digits
from edgefl.simulation.federation import run_federation
from edgefl.simulation.plan import SimulationPlan
from edgefl.simulation.report import headless_pyplot, rounds_to
from edgefl.wire.protocol import TrainingConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.mosquitto import MosquittoBroker

HERE = Path(__file__).resolve().parent
TARGET = 0.95


def run_strategy(name: str, args, data, model) -> dict:
    plan = SimulationPlan(
        devices=args.devices, rounds=args.rounds, strategy=name, seed=args.seed, alpha=args.alpha,
        training=TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                momentum=args.momentum),
        round_timeout=60.0, predict_rate=0.0, fleet=f"bench-{name}", devices_as="threads")
    with tempfile.TemporaryDirectory(prefix=f"edgefl-bench-{name}-") as tmp:
        with MosquittoBroker(persistence_dir=Path(tmp) / "broker") as broker:
            started = time.perf_counter()
            history, final_version, stats, _ = run_federation(plan, broker.url, Path(tmp))
            wall = time.perf_counter() - started
    accuracy = [r.metrics["accuracy"] for r in history]
    reference = in_memory_accuracy(plan, model, data, strategy=name)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="fedavg,fedprox,fedadam",
                        help="comma-separated strategy names")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + PNG")
    args = parser.parse_args(argv)

    print(f"edgefl federated: backend {kernels.BACKEND}; {args.devices} devices, {args.rounds} "
          f"rounds, Dirichlet {args.alpha}; Python {platform.python_version()}", flush=True)
    data = load_digits(args.seed)
    model = build_mlp((64, 32, 10), seed=args.seed)
    results = [run_strategy(name, args, data, model) for name in args.strategies.split(",") if name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"backend": kernels.BACKEND, "python": platform.python_version(),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "target": TARGET, "results": results}
    (out / "federated.json").write_text(json.dumps(summary, indent=1))
    chart(results, out / "federated.png", args)
    print(f"\nwrote {out / 'federated.json'} and {out / 'federated.png'}")


if __name__ == "__main__":
    main()
