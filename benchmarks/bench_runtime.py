"""Device runtime benchmarks: live prediction latency, update size, client footprint.

1. Prediction latency of the 64-32-10 head, one sample per call, p50/p99: idle, and while a
   background thread trains on the digits non-stop and another decodes a new model version from
   its wire message and swaps it in every 10 ms (same run, phases interleaved, medians over
   repetitions; the p99 ratio is the median over repetitions of loaded p99 / the idle p99
   measured just before). Training runs rounds back to back: rounds of the configuration
   ``edgefl simulate`` announces (5 epochs, batch 16, momentum 0.9; the target), and, as the
   worst case, 1-epoch rounds (each round's setup holds the GIL for tens of microseconds, five
   times as often). Also the time of one swap: new weights for the same graph, and a new graph.
   Targets: p99 under load <= 2x idle; swap <= 1 ms. These phases are **closed loop**: each
   predict starts the moment the previous one returned, so every GIL hand-off the background
   threads take lands on a request: the worst case for the tail.
   **Open loop**, as a device serving real requests sees them: Poisson arrivals at 200/s and
   1000/s, idle and while training (the target rounds) runs back to back and a decoded model is
   swapped in every second, alternating. Each request's time is split into *waiting* (from its
   arrival to the start of its predict: the serving thread's wake-up, the GIL, any queue behind
   earlier requests) and *serving* (the predict call). The machine's 1-minute load average is
   recorded with every phase: on a shared CPU the tail is the neighbours' as much as ours.
2. Update bytes per kept coordinate at 1% density of a 100k-parameter update, for every value
   encoding and index coding, and the compression ratio against dense float32 (4 bytes per
   parameter). Target: >= 300x for ternary.
3. Client footprint in a fresh interpreter: import numpy + onnxruntime + paho-mqtt + edgefl's
   device modules (byte-compiled, as an install leaves them), decode a model envelope, open one
   session, predict once; peak RSS and wall time, against a bare interpreter. Targets: <= 70 MiB,
   <= 150 ms.

Writes ``benchmarks/results/runtime.json`` and ``benchmarks/results/runtime.png``.

Run: ``python benchmarks/bench_runtime.py`` (``--quick`` for a short smoke run).
"""
from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import PEAK_MIB_SOURCE, percentile  # noqa: E402

import edgefl  # noqa: E402
from edgefl import kernels, wire  # noqa: E402
from edgefl.device.compression import Compressor  # noqa: E402
from edgefl.simulation.datasets import load_digits  # noqa: E402
from edgefl.device.predictor import Predictor  # noqa: E402
from edgefl.wire.protocol import CompressionConfig, TrainingConfig  # noqa: E402
from edgefl.simulation.plan import SIMULATION_TRAINING  # noqa: E402
from edgefl.simulation.report import headless_pyplot  # noqa: E402
from edgefl.device.trainer import LocalTrainer  # noqa: E402
from edgefl_server.model_builder import build_mlp  # noqa: E402

RESULTS = HERE / "results"
#: Request rates of the open-loop phases (Poisson arrivals), per second.
OPEN_LOOP_RATES = (200.0, 1000.0)


# -- 1. prediction latency ----------------------------------------------------------------------

def _latencies_us(predictor: Predictor, x: np.ndarray, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        predictor.predict(x)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _open_loop_us(predictor: Predictor, x: np.ndarray, rate: float, requests: int,
                  rng: np.random.Generator) -> tuple[list[float], list[float], list[float]]:
    """Serve ``requests`` arriving as a Poisson process of ``rate`` per second, one at a time.

    Returns the microseconds each request waited (from its arrival to the start of its predict:
    the wake-up of the serving thread plus any queueing behind earlier requests), was served
    (the predict call) and both together.
    """
    arrivals = time.perf_counter() + 0.01 + np.cumsum(rng.exponential(1.0 / rate, requests))
    wait, serve = [], []
    for arrival in arrivals:
        ahead = arrival - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        t0 = time.perf_counter()
        predictor.predict(x)
        t1 = time.perf_counter()
        wait.append((t0 - arrival) * 1e6)
        serve.append((t1 - t0) * 1e6)
    return wait, serve, [w + s for w, s in zip(wait, serve)]


def latency(calls: int, reps: int, open_reps: int, open_seconds: float) -> dict:
    model = build_mlp((64, 32, 10), seed=0)
    predictor = Predictor(model)
    X_train, y_train, X_test, _ = load_digits()
    trainer = LocalTrainer(model.manifest)
    trainer.add(X_train, y_train)
    x = X_test[0]
    rng = np.random.default_rng(0)
    # The server's side, done beforehand: the model messages a device will receive, one version
    # after another. The swapping thread does what a device does with each: decode, then swap.
    messages = iter([wire.encode_model(model.with_weights(
        model.weights + rng.normal(0, 0.01, model.weights.size).astype(np.float32),
        version=version, round_id=1)) for version in range(1, 100 * reps + 400)])
    versions = iter(range(1 << 20, 1 << 30))  # for the new-graph swaps after the load phases
    swap_ms: list[float] = []

    @contextlib.contextmanager
    def background_load(config: TrainingConfig, swap_every: float):
        """Training rounds back to back, and a decoded model swapped in every ``swap_every`` s."""
        stop = threading.Event()

        def train():
            while not stop.is_set():
                trainer.train(model.weights, config)

        def swap():
            while not stop.is_set():
                nxt = wire.decode_model(next(messages))
                t0 = time.perf_counter()
                predictor.swap(nxt)
                swap_ms.append((time.perf_counter() - t0) * 1e3)
                stop.wait(swap_every)

        workers = [threading.Thread(target=train), threading.Thread(target=swap)]
        for w in workers:
            w.start()
        time.sleep(0.05)  # let training get going
        try:
            yield
        finally:
            stop.set()
            for w in workers:
                w.join()

    def load_phase(config: TrainingConfig) -> list[float]:
        with background_load(config, 0.01):
            return _latencies_us(predictor, x, calls)

    def open_loop_phase(rate: float, loaded: bool):
        requests = max(200, int(rate * open_seconds))
        if not loaded:
            return _open_loop_us(predictor, x, rate, requests, rng)
        with background_load(rounds, 1.0):
            return _open_loop_us(predictor, x, rate, requests, rng)

    _latencies_us(predictor, x, 500)  # warm up
    rounds = SIMULATION_TRAINING
    one_epoch_rounds = TrainingConfig(epochs=1, batch_size=rounds.batch_size, lr=rounds.lr,
                                      momentum=rounds.momentum)
    idle, load, load_short = [], [], []
    for _ in range(reps):  # interleaved, so drift on a shared machine hits all alike
        lat = _latencies_us(predictor, x, calls)
        idle.append((percentile(lat, 50), percentile(lat, 99)))
        lat = load_phase(rounds)
        load.append((percentile(lat, 50), percentile(lat, 99)))
        lat = load_phase(one_epoch_rounds)
        load_short.append((percentile(lat, 50), percentile(lat, 99)))

    # Open loop: requests arrive on their own schedule, as a device serving real traffic sees
    # them, whether or not the previous one is done.
    open_loop = {}
    for rate in OPEN_LOOP_RATES:
        phases = {"idle": [], "load": []}
        loads = []
        for _ in range(open_reps):  # idle and loaded alternate, as above
            for name in ("idle", "load"):
                loads.append(os.getloadavg()[0])
                phases[name].append(open_loop_phase(rate, name == "load"))
        row = {"requests_per_phase": len(phases["idle"][0][0]), "repetitions": open_reps,
               "load_average_1min": [min(loads), max(loads)]}
        for name, reps_ in phases.items():
            for part, index in (("wait", 0), ("serve", 1), ("total", 2)):
                row[f"{name}_{part}_p50_us"] = statistics.median(
                    percentile(r[index], 50) for r in reps_)
                row[f"{name}_{part}_p99_us"] = statistics.median(
                    percentile(r[index], 99) for r in reps_)
        for part, index in (("total", 2), ("serve", 1)):
            ratios = [percentile(loaded[index], 99) / percentile(quiet[index], 99)
                      for quiet, loaded in zip(phases["idle"], phases["load"])]
            row[f"p99_{part}_ratio_load_over_idle"] = statistics.median(ratios)
            row[f"p99_{part}_ratio_load_over_idle_range"] = [min(ratios), max(ratios)]
        open_loop[f"{rate:g}/s"] = row

    graph_ms = []
    for i in range(15):  # a new graph each time: alternate two architectures
        other = build_mlp((64, 32, 10) if i % 2 else (64, 16, 10), seed=i)
        other = other.with_weights(other.weights, version=next(versions), round_id=2)
        t0 = time.perf_counter()
        predictor.swap(other)
        graph_ms.append((time.perf_counter() - t0) * 1e3)

    result = {
        "calls_per_phase": calls, "repetitions": reps,
        "training_rounds": {"epochs": rounds.epochs, "batch_size": rounds.batch_size,
                            "samples": trainer.num_samples},
        "idle_p50_us": statistics.median(p for p, _ in idle),
        "idle_p99_us": statistics.median(p for _, p in idle),
        "load_p50_us": statistics.median(p for p, _ in load),
        "load_p99_us": statistics.median(p for _, p in load),
        "load_1epoch_rounds_p50_us": statistics.median(p for p, _ in load_short),
        "load_1epoch_rounds_p99_us": statistics.median(p for _, p in load_short),
        "swap_weights_ms_median": statistics.median(swap_ms),
        "swap_weights_ms_p99": percentile(swap_ms, 99),
        "swaps_during_load": len(swap_ms),
        "swap_new_graph_ms_median": statistics.median(graph_ms),
        "open_loop": open_loop,
    }
    # The ratio of each repetition's loaded phase to the idle phase just before it: neighbours
    # share the machine's state, so this is steadier than a ratio of medians on a shared host.
    for key, phases in (("p99_ratio_load_over_idle", load),
                        ("p99_ratio_load_1epoch_rounds_over_idle", load_short)):
        ratios = [loaded[1] / quiet[1] for loaded, quiet in zip(phases, idle)]
        result[key] = statistics.median(ratios)
        result[key + "_range"] = [min(ratios), max(ratios)]
    return result


# -- 2. update size -----------------------------------------------------------------------------

def update_size(n: int = 100_000, density: float = 0.01) -> dict:
    delta = np.random.default_rng(0).normal(size=n).astype(np.float32)
    codecs = {"varint": kernels.encode_indices, "rice": kernels.encode_indices_rice,
              "bitmap": kernels.encode_indices_bitmap}
    rows = {}
    for values in wire.VALUE_ENCODINGS:
        comp = Compressor(CompressionConfig(method="topk", density=density, values=values), n)
        idx, vals = comp.sparsify(delta)
        update = wire.Update("device-01", 1, 1, 1, 100, n, idx, vals, values)
        message = wire.encode_update(update)
        index_bytes = {name: len(encode(idx, n)) for name, encode in codecs.items()}
        rows[values] = {
            "k": int(len(idx)),
            "message_bytes": len(message),
            "bytes_per_kept_coordinate": len(message) / len(idx),
            "index_bytes": index_bytes,
            # Header fields of docs/wire-format.md: value code at byte 5, value bytes at 44.
            "wire_value_code": wire.WIRE_VALUE_CODES[message[5]],
            "value_bytes": struct.unpack_from("<I", message, 44)[0],
            "ratio_vs_dense_f32": 4 * n / len(message),
        }
    dense = wire.encode_update(wire.Update("device-01", 1, 1, 1, 100, n, None, delta, "f32"))
    return {"num_params": n, "density": density, "encodings": rows,
            "dense_f32_message_bytes": len(dense)}


# -- 3. client footprint ------------------------------------------------------------------------

FOOTPRINT = PEAK_MIB_SOURCE + """
import sys, time
t0 = time.perf_counter()
import numpy, onnxruntime, paho.mqtt.client
import edgefl, edgefl.device.predictor, edgefl.wire, edgefl.device.trainer, edgefl.device.privacy, edgefl.device.compression
model = edgefl.wire.decode_model(open(sys.argv[1], "rb").read())
p = edgefl.device.predictor.Predictor(model)
p.predict(numpy.zeros(model.manifest.input_width, numpy.float32))
print(time.perf_counter() - t0, peak_mib())
"""
DEPENDENCIES = PEAK_MIB_SOURCE + """
import time
t0 = time.perf_counter()
import numpy, onnxruntime, paho.mqtt.client
print(time.perf_counter() - t0, peak_mib())
"""
BARE = PEAK_MIB_SOURCE + """
import time
t0 = time.perf_counter()
print(time.perf_counter() - t0, peak_mib())
"""


def _subprocess_run(code: str, *args: str) -> tuple[float, float, float]:
    """(in-process seconds, peak RSS MiB, whole-process wall seconds) of a fresh interpreter."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True)
    wall = time.perf_counter() - t0
    seconds, rss = map(float, out.stdout.split())
    return seconds, rss, wall


def footprint(reps: int) -> dict:
    # pip byte-compiles a package as it installs it, as it did the dependencies here; an editable
    # checkout (or a shell with PYTHONDONTWRITEBYTECODE=1) may hold no bytecode for edgefl, and
    # the timing would then include compiling its sources on every start.
    compileall.compile_dir(str(Path(edgefl.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        path.write_bytes(wire.encode_model(build_mlp((64, 32, 10))))
        device, deps, bare = [], [], []
        for _ in range(reps):  # interleaved, so machine load hits all three alike
            device.append(_subprocess_run(FOOTPRINT, str(path)))
            deps.append(_subprocess_run(DEPENDENCIES))
            bare.append(_subprocess_run(BARE))
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    return {
        "repetitions": reps,
        "device_import_session_predict_ms": med(device, 0) * 1e3,
        "device_peak_rss_mib": med(device, 1),
        "device_process_wall_ms": med(device, 2) * 1e3,
        "dependencies_import_ms": med(deps, 0) * 1e3,
        "dependencies_peak_rss_mib": med(deps, 1),
        "bare_peak_rss_mib": med(bare, 1),
        "bare_process_wall_ms": med(bare, 2) * 1e3,
    }


# -- report -------------------------------------------------------------------------------------

def plot(results: dict, path: Path) -> None:
    plt = headless_pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lat = results["latency"]
    ax = axes[0]
    labels = ["p50", "p99"]
    idle = [lat["idle_p50_us"], lat["idle_p99_us"]]
    load = [lat["load_p50_us"], lat["load_p99_us"]]
    short = [lat["load_1epoch_rounds_p50_us"], lat["load_1epoch_rounds_p99_us"]]
    pos = np.arange(2)
    ax.bar(pos - 0.27, idle, 0.27, label="idle")
    ax.bar(pos, load, 0.27, label="training (5-epoch rounds) + swaps")
    ax.bar(pos + 0.27, short, 0.27, label="1-epoch rounds + swaps")
    ax.axhline(2 * lat["idle_p99_us"], color="grey", ls="--", lw=1, label="target: 2x idle p99")
    ax.set_xticks(pos, labels)
    ax.set_ylabel("latency per prediction (us)")
    ax.set_title(f"64-32-10 predict, closed loop (worst case); swap "
                 f"{lat['swap_weights_ms_median']:.3f} ms median", fontsize=9)
    ax.legend()

    size = results["update_size"]
    ax = axes[1]
    names = list(size["encodings"])
    ratios = [size["encodings"][n]["ratio_vs_dense_f32"] for n in names]
    ax.bar(names, ratios, color="tab:green")
    ax.axhline(300, color="grey", ls="--", lw=1, label="target 300x (ternary)")
    for i, n in enumerate(names):
        ax.text(i, ratios[i], f"{size['encodings'][n]['bytes_per_kept_coordinate']:.2f} B/coord",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("compression vs dense float32 (x)")
    ax.set_title(f"top-k 1% of {size['num_params']:,} params")
    ax.legend()

    foot = results["footprint"]
    ax = axes[2]
    ax.bar(["bare", "numpy+ort+paho", "device path"],
           [foot["bare_peak_rss_mib"], foot["dependencies_peak_rss_mib"],
            foot["device_peak_rss_mib"]], color="tab:purple")
    ax.axhline(70, color="grey", ls="--", lw=1, label="target 70 MiB")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title(f"client footprint; import+session+predict "
                 f"{foot['device_import_session_predict_ms']:.0f} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args(argv)
    calls, reps, foot_reps = (1000, 2, 3) if args.quick else (4000, 15, 9)
    open_reps, open_seconds = (2, 1.0) if args.quick else (7, 3.0)
    results = {
        "machine": {"python": platform.python_version(), "processor": platform.machine(),
                    "cpus": os.cpu_count(), "kernels": kernels.BACKEND,
                    # other work on the machine shows up in the p99s: say how busy it was
                    "load_average_1min_at_start": os.getloadavg()[0]},
        "latency": latency(calls, reps, open_reps, open_seconds),
        "update_size": update_size(),
        "footprint": footprint(foot_reps),
    }
    lat, foot = results["latency"], results["footprint"]
    print(f"predict 64-32-10, 1 sample: idle p50 {lat['idle_p50_us']:.1f} us, p99 "
          f"{lat['idle_p99_us']:.1f} us | training (5-epoch rounds) + swaps p50 "
          f"{lat['load_p50_us']:.1f} us, p99 {lat['load_p99_us']:.1f} us | p99 ratio "
          f"{lat['p99_ratio_load_over_idle']:.2f} (target <= 2; repetitions "
          f"{lat['p99_ratio_load_over_idle_range'][0]:.2f}-"
          f"{lat['p99_ratio_load_over_idle_range'][1]:.2f})")
    print(f"  worst case, 1-epoch rounds back to back + swaps: p50 "
          f"{lat['load_1epoch_rounds_p50_us']:.1f} us, p99 {lat['load_1epoch_rounds_p99_us']:.1f} "
          f"us, ratio {lat['p99_ratio_load_1epoch_rounds_over_idle']:.2f} (repetitions "
          f"{lat['p99_ratio_load_1epoch_rounds_over_idle_range'][0]:.2f}-"
          f"{lat['p99_ratio_load_1epoch_rounds_over_idle_range'][1]:.2f})")
    print("  (closed loop: each predict starts when the previous one ends, the worst case for the "
          "tail; open loop below)")
    for rate, row in lat["open_loop"].items():
        print(f"open loop, Poisson arrivals at {rate}: idle p50/p99 wait "
              f"{row['idle_wait_p50_us']:.0f}/{row['idle_wait_p99_us']:.0f} us serve "
              f"{row['idle_serve_p50_us']:.0f}/{row['idle_serve_p99_us']:.0f} us | training + a "
              f"swap per second: wait {row['load_wait_p50_us']:.0f}/{row['load_wait_p99_us']:.0f}"
              f" us serve {row['load_serve_p50_us']:.0f}/{row['load_serve_p99_us']:.0f} us | p99 "
              f"ratio total {row['p99_total_ratio_load_over_idle']:.2f} (target <= 2), serve "
              f"{row['p99_serve_ratio_load_over_idle']:.2f}; 1-min load "
              f"{row['load_average_1min'][0]:.2f}-{row['load_average_1min'][1]:.2f}")
    print(f"swap: new weights {lat['swap_weights_ms_median']:.3f} ms median "
          f"(p99 {lat['swap_weights_ms_p99']:.3f}, {lat['swaps_during_load']} swaps), new graph "
          f"{lat['swap_new_graph_ms_median']:.3f} ms (target <= 1 ms)")
    size = results["update_size"]
    print(f"\nupdate of {size['num_params']:,} params at {size['density']:.0%} density "
          f"(dense f32 message: {size['dense_f32_message_bytes']:,} bytes)")
    print(f"{'values':<9}{'bytes':>8}{'B/coord':>9}{'ratio':>9}   index bytes (varint/rice/bitmap)")
    for name, row in size["encodings"].items():
        ib = row["index_bytes"]
        print(f"{name:<9}{row['message_bytes']:>8}{row['bytes_per_kept_coordinate']:>9.2f}"
              f"{row['ratio_vs_dense_f32']:>8.0f}x   {ib['varint']}/{ib['rice']}/{ib['bitmap']}")
    print(f"\nfootprint: device path peak RSS {foot['device_peak_rss_mib']:.1f} MiB (numpy+ort+paho "
          f"alone {foot['dependencies_peak_rss_mib']:.1f}, bare {foot['bare_peak_rss_mib']:.1f}); "
          f"import+session+predict {foot['device_import_session_predict_ms']:.0f} ms (imports of "
          f"numpy+ort+paho alone {foot['dependencies_import_ms']:.0f} ms; process wall "
          f"{foot['device_process_wall_ms']:.0f} ms, bare {foot['bare_process_wall_ms']:.0f} ms)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "runtime.png")
    print(f"\nwrote {RESULTS / 'runtime.json'} and {RESULTS / 'runtime.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
