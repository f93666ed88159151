"""Noise added in place against NumPy's ``x += rng.<distribution>(..., n)``.

Adding noise again and again to the same array is what both sides time (no reset needed: the
values only random-walk). The table's ``vs_rng_floor`` column compares ``laplace_`` with a bare
``standard_exponential(dtype=float32)`` fill of n, the cost of the randomness itself.
"""
import numpy as np

from harness import Comparison

import edgefl.kernels as K

SCALE = 0.1
LAPLACE_TARGETS = {10**6: 3.5}  # NumPy time / edgefl time at 10^6; within 1.3x of the RNG floor


def comparisons(sizes):
    cases = []
    for n in sizes:
        ours, theirs = np.zeros(n, np.float32), np.zeros(n, np.float32)
        rng_ours, rng_theirs = np.random.default_rng(1), np.random.default_rng(1)
        cases.append(Comparison(
            "laplace_", n,
            edgefl=lambda x=ours, rng=rng_ours: K.laplace_(x, SCALE, rng),
            numpy=lambda x=theirs, rng=rng_theirs, n=n: x.__iadd__(rng.laplace(0.0, SCALE, n)),
            min_ratio=LAPLACE_TARGETS.get(n),
            note="x += rng.laplace(0, b, n)",
        ))
        cases.append(Comparison(
            "gaussian_", n,
            edgefl=lambda x=ours, rng=rng_ours: K.gaussian_(x, SCALE, rng),
            numpy=lambda x=theirs, rng=rng_theirs, n=n: x.__iadd__(rng.normal(0.0, SCALE, n)),
            note="x += rng.normal(0, s, n)",
        ))
        cases.append(Comparison(
            "gaussian_ (float32 baseline)", n,
            edgefl=lambda x=ours, rng=rng_ours: K.gaussian_(x, SCALE, rng),
            numpy=lambda x=theirs, rng=rng_theirs, n=n: x.__iadd__(
                np.float32(SCALE) * rng.standard_normal(n, dtype=np.float32)),
            note="x += s * rng.standard_normal(n, dtype=float32)",
        ))
    return cases
