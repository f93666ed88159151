"""Kernel microbenchmarks: every edgefl kernel against its NumPy idiom, in the same run.

Prints a table of medians (ns/element, or us/call for the SGD steps) with the ratio
NumPy time / edgefl time, next to the memory-copy floor (``np.copyto``) and the RNG floor (a
``Generator.standard_exponential(dtype=float32)`` fill). Writes ``benchmarks/results/kernels.json``
and ``benchmarks/results/kernels.png``.

Run: ``python benchmarks/bench_kernels.py`` (``--sizes 1e4,1e5`` for a quick run, ``--only topk``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Comparison, median_seconds  # noqa: E402

import edgefl.kernels as K  # noqa: E402
from edgefl.simulation.report import headless_pyplot  # noqa: E402

GROUPS = ["clip", "noise", "topk", "pipeline", "codec", "sgd"]
DEFAULT_SIZES = [10**4, 10**5, 10**6, 10**7]


def floors(n: int) -> dict:
    """Per-element cost of copying n float32 and of filling n float32 exponentials."""
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    rng = np.random.default_rng(1)
    copy = median_seconds(lambda: np.copyto(dst, src))
    fill = median_seconds(lambda: rng.standard_exponential(out=dst, dtype=np.float32))
    return {"copy_ns": copy / n * 1e9, "rng_ns": fill / n * 1e9}


def compare(case: Comparison, rounds: int = 5):
    """Median times of edgefl and NumPy and the median of their per-round ratios.

    The two sides are timed in alternation, ``rounds`` times, so a change in machine load hits
    both alike instead of skewing one side's whole measurement.
    """
    ours, base, ratios = [], [], []
    for _ in range(rounds):
        ours.append(median_seconds(case.edgefl, setup=case.setup, repeat=7, max_total=0.6))
        base.append(median_seconds(case.numpy, setup=case.setup, repeat=7, max_total=0.6))
        ratios.append(base[-1] / ours[-1])
    return statistics.median(ours), statistics.median(base), statistics.median(ratios)


def run(sizes, only=None):
    rows, floor_rows = [], {}
    for n in sizes:
        floor_rows[n] = floors(n)
        print(f"n={n:>9,}  copy floor {floor_rows[n]['copy_ns']:.3f} ns/el   "
              f"RNG floor {floor_rows[n]['rng_ns']:.3f} ns/el", flush=True)
    header = f"{'kernel':<28}{'n':>10}{'edgefl':>12}{'numpy':>12}{'ratio':>8}{'target':>9}  note"
    print("\n" + header + "\n" + "-" * len(header))
    for group in GROUPS:
        if only and group not in only:
            continue
        module = importlib.import_module(f"kernel_cases.{group}")
        for case in module.comparisons(sizes):
            ours, base, ratio = compare(case)
            scale, unit = (1e9 / case.n, "ns/el") if case.n else (1e6, "us")
            met = None if case.min_ratio is None else ratio >= case.min_ratio
            row = {
                "group": group, "kernel": case.kernel, "n": case.n, "unit": unit,
                "edgefl": ours * scale, "numpy": base * scale, "ratio": ratio,
                "target": case.min_ratio, "met": met, "note": case.note, **case.extra,
            }
            if case.n in floor_rows:
                row["vs_copy_floor"] = row["edgefl"] / floor_rows[case.n]["copy_ns"]
                row["vs_rng_floor"] = row["edgefl"] / floor_rows[case.n]["rng_ns"]
            rows.append(row)
            target = "" if case.min_ratio is None else f">={case.min_ratio:g}x" + ("" if met else "!")
            n_label = f"{case.n:,}" if case.n else "-"
            print(f"{case.kernel:<28}{n_label:>10}{row['edgefl']:>9.3f}{unit[:2]:>3}"
                  f"{row['numpy']:>9.3f}{unit[:2]:>3}{ratio:>7.2f}x{target:>9}  {case.note}", flush=True)
    return rows, floor_rows


def chart(rows, path):
    plt = headless_pyplot()

    # The codec's ratios (up to ~200x against NumPy's loops) would flatten every other line: the
    # chart shows the kernels of the update path, the table and JSON have everything.
    kernels = [k for k in dict.fromkeys(r["kernel"] for r in rows
                                        if r["n"] and r.get("group") != "codec")]
    per_call = [r for r in rows if not r["n"]]
    fig, axes = plt.subplots(1, 2 if per_call else 1, figsize=(14 if per_call else 10, 5),
                             gridspec_kw={"width_ratios": [2, 1]} if per_call else None, squeeze=False)
    ax = axes[0][0]
    for kernel in kernels:
        pts = [(r["n"], r["ratio"]) for r in rows if r["kernel"] == kernel and r["n"]]
        ax.plot(*zip(*pts), marker="o", label=kernel)
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements (n)")
    ax.set_ylabel("speed-up over NumPy (NumPy time / edgefl time)")
    ax.set_title(f"edgefl kernels vs NumPy, medians ({K.BACKEND} backend)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    if per_call:
        bar = axes[0][1]
        labels = [r["kernel"] for r in per_call]
        bar.barh(labels, [r["ratio"] for r in per_call], color="tab:green")
        bar.axvline(1.0, color="grey", lw=1, ls="--")
        bar.set_xlabel("speed-up over NumPy (per call)")
        bar.set_title("SGD steps, batch 32")
        bar.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                        help="comma-separated element counts (default: 1e4,1e5,1e6,1e7)")
    parser.add_argument("--only", default="", help=f"comma-separated groups from {GROUPS}")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + PNG")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    only = [g for g in args.only.split(",") if g] or None
    print(f"edgefl kernels: backend {K.BACKEND}; NumPy {np.__version__}; Python {platform.python_version()}; "
          f"{platform.machine()}")
    rows, floor_rows = run(sizes, only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "kernels.json"
    if only and previous.exists():
        # A partial run replaces only its own groups' rows in the last full result.
        kept = [r for r in json.loads(previous.read_text())["rows"] if r.get("group") not in only]
        rows = kept + rows
    result = {
        "backend": K.BACKEND, "numpy": np.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(),
        "floors": {str(n): f for n, f in floor_rows.items()}, "rows": rows,
    }
    (out / "kernels.json").write_text(json.dumps(result, indent=1))
    chart(rows, out / "kernels.png")
    print(f"\nwrote {out / 'kernels.json'} and {out / 'kernels.png'}")


if __name__ == "__main__":
    main()
