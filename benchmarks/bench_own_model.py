"""A round of fine-tuning a user's CNN on a device: cached extractor features vs recomputing them.

The model is the PyTorch small CNN of the test fixtures (``tests/data/torch_cnn.onnx``: a 3x3
convolution with 4 channels on 8x8 images, a 144-16 dense layer, a 16-10 output layer),
imported with ``--trainable-layers 1``: the convolution and the first dense layer are the frozen
extractor, the last layer trains. The device holds the 1347 training digits.

* **cached** (what edgefl does): the extractor's features were computed once when the samples
  were added; a round is the head's SGD only (``LocalTrainer.train``).
* **recomputed** (the baseline): the same round preceded by running the extractor with
  onnxruntime over every stored sample (``LocalTrainer.set_featurizer``, the work a device
  without the cache would do each round).

Both alternate within one run (cached, recomputed, cached, ...), each repetition times one
round; medians and the ratio are reported with the machine's load (``/proc/loadavg``) before
and after. Rounds of the configuration ``edgefl simulate`` announces (5 epochs, batch 16,
momentum 0.9) and of one epoch.

Writes ``benchmarks/results/own_model.json``. Run: ``python benchmarks/bench_own_model.py``
(``--quick`` for a short smoke run).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgefl import kernels
from edgefl.simulation.datasets import load_digits
from edgefl.device.predictor import Predictor
from edgefl.simulation.plan import SIMULATION_TRAINING
from edgefl.device.trainer import LocalTrainer
from edgefl_server.onnx_import import import_onnx

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "tests" / "data" / "torch_cnn.onnx"
RESULTS = HERE / "results"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"


def time_rounds(trainer, predictor, weights, config, repeat):
    """Alternating repetitions: (cached seconds, recomputed seconds) per round."""
    cached, recomputed = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        trainer.train(weights, config)
        cached.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.set_featurizer(predictor.features)
        trainer.train(weights, config)
        recomputed.append(time.perf_counter() - start)
    return cached, recomputed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else args.repeat

    model = import_onnx(FIXTURE, trainable_layers=1)
    predictor = Predictor(model)
    X_train, y_train, _, _ = load_digits(0)
    trainer = LocalTrainer(model.manifest, capacity=len(y_train), featurizer=predictor.features)
    trainer.add(X_train, y_train)
    start = time.perf_counter()
    predictor.features(X_train)
    features_once = time.perf_counter() - start

    load_before = loadavg()
    results = {}
    for label, config in (("simulate_config", SIMULATION_TRAINING),
                          ("one_epoch", replace(SIMULATION_TRAINING, epochs=1))):
        time_rounds(trainer, predictor, model.weights, config, 1)  # warm-up
        cached, recomputed = time_rounds(trainer, predictor, model.weights, config, repeat)
        c, r = statistics.median(cached), statistics.median(recomputed)
        results[label] = {"epochs": config.epochs, "batch_size": config.batch_size,
                          "cached_ms": round(c * 1e3, 3), "recomputed_ms": round(r * 1e3, 3),
                          "ratio": round(r / c, 2), "repetitions": repeat}
        print(f"{label:16s} cached {c * 1e3:8.2f} ms   recomputed {r * 1e3:8.2f} ms   "
              f"recomputed/cached {r / c:5.2f}x")
    summary = {
        "model": "tests/data/torch_cnn.onnx, --trainable-layers 1",
        "head": list(model.manifest.layer_sizes), "trainable_params": model.manifest.num_params,
        "samples": int(len(y_train)), "kernels": kernels.BACKEND,
        "extractor_over_all_samples_ms": round(features_once * 1e3, 3),
        "rounds": results, "loadavg_before": load_before, "loadavg_after": loadavg(),
        "machine": platform.platform(), "python": platform.python_version(),
    }
    print(f"extractor over all {len(y_train)} samples once: {features_once * 1e3:.2f} ms; "
          f"load {load_before} -> {summary['loadavg_after']}")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "own_model.json").write_text(json.dumps(summary, indent=1))
        print(f"wrote {RESULTS / 'own_model.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
