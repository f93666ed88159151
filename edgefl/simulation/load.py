"""The device side of the simulation's latency measurement: a steady prediction load.

:class:`PredictionLoad` serves predictions on local samples at a fixed rate while the device
trains and swaps models, and records each one's latency with the phase the device was in.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Phases a prediction is attributed to in :class:`PredictionLoad`.
IDLE, TRAINING, SWAP = 0, 1, 2
PHASES = {IDLE: "idle", TRAINING: "training", SWAP: "swap"}
#: A prediction that starts within this many seconds after a model swap counts as "during a swap"
#: (a new session's first runs and the swap's cache effects land there).
SWAP_WINDOW = 0.05


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
    records_path : path, optional
        Where :meth:`stop` writes :meth:`records` (``.npz``; the simulation pools every
        device's records).
    """

    def __init__(self, client, X, *, rate: float, seed: int = 0, max_records: int = 1_000_000,
                 records_path=None):
        if not rate > 0:
            raise ValueError(f"prediction rate must be positive, got {rate!r}")
        self.client = client
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        self.rate = float(rate)
        self.records_path = None if records_path is None else Path(records_path)
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

    def stop(self) -> dict:
        """Stop serving, write the records to ``records_path`` if given; return :meth:`stats`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.records_path is not None:
            self.save(self.records_path)
        return self.stats()

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

