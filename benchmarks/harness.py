"""Timing helpers shared by edgefl's benchmarks: medians of many runs, same-run baselines."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Comparison:
    """One edgefl kernel against its NumPy baseline at one size, timed in the same run.

    ``n`` is the element count for ns/element figures; ``None`` reports microseconds per call.
    ``setup`` (optional) runs before every timed call, untimed, and returns nothing: use it to
    reset state an in-place kernel changed. ``targets`` maps a label to the minimum ratio
    (NumPy time / edgefl time) the issue asks for, so the table can say whether it is met.
    """

    kernel: str
    n: int | None
    edgefl: Callable[[], object]
    numpy: Callable[[], object]
    setup: Callable[[], None] | None = None
    min_ratio: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def median_seconds(fn: Callable[[], object], *, setup: Callable[[], None] | None = None,
                   repeat: int = 21, min_sample: float = 2e-3, max_total: float = 3.0) -> float:
    """Median wall time of one call of ``fn``, in seconds.

    Without ``setup``, each of ``repeat`` samples loops ``fn`` enough times to last at least
    ``min_sample`` seconds (so timer resolution does not matter); with ``setup``, each sample is
    one call after an untimed ``setup()``. Stops early once ``max_total`` seconds are spent.
    """
    if setup is not None:
        setup()
    fn()  # warm up: first-touch page faults, lazy imports, caches
    samples = []
    spent = time.perf_counter()
    if setup is None:
        number = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_sample or number >= 1 << 20:
                break
            number *= 2
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - t0) / number)
            if time.perf_counter() - spent > max_total and len(samples) >= 5:
                break
    else:
        for _ in range(repeat):
            setup()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            if time.perf_counter() - spent > max_total and len(samples) >= 5:
                break
    return statistics.median(samples)


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) of ``values`` by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


#: Source of ``peak_mib()`` for a benchmark's child interpreter: peak RSS from /proc/self/status
#: VmHWM (getrusage's ru_maxrss survives exec on Linux, so a child of a large benchmark process
#: would report the parent's high-water mark).
PEAK_MIB_SOURCE = """
def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
