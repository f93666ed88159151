"""The kernels let other Python threads run: a device keeps serving predictions while it trains.

A counter thread increments a number in pure Python. While it runs, the GIL switch interval is
raised to far beyond the test's duration, so the GIL changes hands only when a thread gives it up
voluntarily: the counter does so every few thousand counts, and a kernel does so only if it
releases the GIL. The progress of the counter between just before and just after a batch of
kernel calls made from the main thread is therefore zero for code that holds the GIL, whatever
the machine's load, and large for a kernel that runs its loop without the GIL. The test counts
progress, never time; the control cases show that the measurement tells the two apart.
"""
import sys
import threading
import time

import numpy as np
import pytest

from backends import COMPILED, TWIN

pytestmark = pytest.mark.kernels

COUNTS_PER_YIELD = 2000
#: The counter completed at least this many of its rounds during the kernel calls. A kernel that
#: kept the GIL allows none (no forced switches), so a few are proof; more would only measure how
#: much CPU a loaded machine gave the counter thread (25 failed at a load average of 6 on 2 CPUs).
MIN_ROUNDS = 3


class Counter:
    """A thread counting in pure Python, pausing every ``COUNTS_PER_YIELD`` counts."""

    def __init__(self):
        self.count = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, name="gil-counter", daemon=True)

    def _run(self):
        while self._running:
            for _ in range(COUNTS_PER_YIELD):
                self.count += 1
            # A voluntary release, long enough for a waiting main thread to wake up and take the
            # GIL (after a zero sleep this thread could win it straight back).
            time.sleep(1e-4)

    def __enter__(self):
        self._thread.start()
        while self.count == 0:  # sleeping releases the GIL: wait until the counter runs
            time.sleep(0.001)
        return self

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()


def counter_progress(call, repeats):
    """How far the counter advanced while ``call()`` ran ``repeats`` times in this thread."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # no forced switches: only voluntary releases hand over the GIL
    try:
        with Counter() as counter:
            before = counter.count
            for _ in range(repeats):
                call()
            return counter.count - before
    finally:
        sys.setswitchinterval(interval)


def python_loop():
    """A NumPy-free loop that holds the GIL the whole time (about as long as a kernel call)."""
    total = 0
    for i in range(300_000):
        total += i * i
    return total


def test_control_gil_holding_loop_stops_the_counter():
    assert counter_progress(python_loop, 3) == 0


def test_control_sleep_lets_the_counter_run():
    assert counter_progress(lambda: time.sleep(0.05), 3) >= MIN_ROUNDS * COUNTS_PER_YIELD


@pytest.fixture(scope="module")
def long_calls():
    """``calls(K)``: kernel name -> (a call of backend K's kernel on large data, how many calls)."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal(20_000_000, dtype=np.float32)
    residual = np.zeros(10_000_000, np.float32)
    update = rng.standard_normal(10_000_000, dtype=np.float32)
    scratch = big.copy()
    noise_rng = np.random.default_rng(1)
    sizes = (256, 256, 10)
    layers = [(rng.standard_normal(shape, dtype=np.float32) / 16, np.zeros(shape[1], np.float32))
              for shape in zip(sizes[:-1], sizes[1:])]
    X = rng.standard_normal((2048, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], 2048)
    return lambda K: {
        "topk": (lambda: K.topk(big, 200_000), 3),
        "topk_ef_": (lambda: K.topk_ef_(residual, update, 100_000), 4),
        "threshold_select": (lambda: K.threshold_select(big, 2.5), 4),
        "randomk": (lambda: K.randomk(20_000_000, 2_000_000, 7), 3),
        # The other long kernels a device runs on every update.
        "clip_l2_": (lambda: K.clip_l2_(scratch, 1e9), 8),
        "clip_l1_": (lambda: K.clip_l1_(scratch, 1e12), 8),
        "laplace_": (lambda: K.laplace_(scratch, 1e-3, noise_rng), 3),
        # A whole round of training: every epoch's shuffle, gathers and steps.
        "mlp_sgd_epochs_": (lambda: K.mlp_sgd_epochs_(layers, X, y, 1e-4, rng=noise_rng,
                                                      epochs=8, batch_size=32), 3),
    }


# The NumPy twin releases the GIL wherever NumPy does, inside its array loops: true for the
# vectorised top-k family, not for randomk's twin, which is a Python loop over k draws, nor for
# the epochs' twin, a Python loop over minibatches.
RELEASED_BY_COMPILED = ["topk", "topk_ef_", "threshold_select", "randomk", "clip_l2_", "clip_l1_",
                        "laplace_", "mlp_sgd_epochs_"]
RELEASED_BY_TWIN = ["topk", "topk_ef_", "threshold_select"]


@pytest.mark.parametrize("K, name", [(COMPILED, name) for name in RELEASED_BY_COMPILED]
                         + [(TWIN, name) for name in RELEASED_BY_TWIN],
                         ids=[f"compiled-{name}" for name in RELEASED_BY_COMPILED]
                         + [f"twin-{name}" for name in RELEASED_BY_TWIN])
def test_kernel_lets_other_threads_run(K, name, long_calls):
    call, repeats = long_calls(K)[name]
    progress = counter_progress(call, repeats)
    assert progress >= MIN_ROUNDS * COUNTS_PER_YIELD, (
        f"{name} ({K.BACKEND} backend) kept the GIL: the counter advanced only {progress} counts "
        f"during {repeats} calls"
    )
