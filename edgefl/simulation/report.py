"""What a simulated federation reports: a progress line per round, the summary (``summary.json``),
its human-readable form and the accuracy plot."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgefl.simulation.load import latency_summary
from edgefl.simulation.plan import SimulationPlan, partition_text

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


def rounds_to(accuracies, target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches ``target``, or None."""
    return next((i + 1 for i, a in enumerate(accuracies) if a is not None and a >= target), None)


#: How the summary describes a provisioned run and an insecure one.
SECURE_RUN = ("provisioned: TLS with the fleet's CA, a broker login per device, ACL, every server "
              "message signed (Ed25519) and verified, every update sealed to the server's key")
INSECURE_RUN = "INSECURE (--insecure): anonymous plain MQTT, no signatures, updates in the clear"


def summarize(plan: SimulationPlan, history, final_version, stats, records, *,
              centralised, dense_fedavg, num_params: int, wall_seconds: float,
              task_name: str = "digits, 64-32-10 MLP", initial_accuracy=None,
              privacy: dict | None = None, security: str = SECURE_RUN) -> dict:
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
        "task": task_name,
        "initial_accuracy": initial_accuracy,
        "privacy": privacy or {},
        "security": security,
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

    lines = ["", f"accuracy of the initial model (version 0): {pct(summary['initial_accuracy'])}"
             if summary.get("initial_accuracy") is not None else "",
             "accuracy per round (federated | centralised, same epochs"
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
        *([f"privacy: {summary['privacy']['summary']}"] if summary.get("privacy") else []),
        f"{summary['devices_on_final_version']} of {len(summary['devices'])} devices ended on the "
        f"final model version {summary['final_model_version']}; {summary['wall_seconds']} s",
        f"security: {summary['security']}; server messages refused by devices: "
        f"{sum(_refused(s) for s in summary['devices'])}",
    ]
    return "\n".join(lines)


def _refused(stats: dict) -> int:
    return sum(stats.get(k, 0) for k in ("refused_signature", "refused_misbound", "refused_replay"))


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


def headless_pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: no display needed)."""
    # deferred for start-up time: matplotlib takes ~0.3 s to import and only a plot needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred with matplotlib, after choosing its backend
    import matplotlib.pyplot as plt

    return plt


def write_plot(summary: dict, path: Path) -> None:
    """Accuracy against rounds for the run and its baselines."""
    plt = headless_pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = np.arange(1, len(summary["accuracy"]) + 1)
    plan = summary["plan"]
    training = plan["training"]
    label = f"{plan['strategy']}, {plan['devices']} devices"
    if training["compression"]["method"] != "none" or training["compression"]["values"] != "f32":
        label += f", {training['compression']['method']} {training['compression']['values']}"
    if training["privacy"]["mechanism"] != "none":
        privacy = training["privacy"]
        label += f", {privacy['mechanism']} eps {privacy['epsilon']:g}/round"
    if summary.get("privacy", {}).get("mode") == "central":
        label += f", central DP eps {summary['privacy']['epsilon']:.3g}"
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
    partition = plan["partition"] or ("dirichlet", plan["alpha"])
    ax.set_title(f"{summary['task']}, {partition_text(partition)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
