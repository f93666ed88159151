"""The client pipeline a device runs on each update under differential privacy, end to end.

L1 clip (the sensitivity Laplace noise is calibrated to), Laplace noise on the dense clipped
update, then top-k with error feedback. Noise comes before the data-dependent selection, so the
selection is post-processing and keeps the DP guarantee. edgefl's kernels in sequence against the
NumPy idioms in sequence: ``np.abs(x).sum()`` and a scale, ``x += rng.laplace(0, b, n)``, and
argpartition top-k with error feedback. k = n/100.
"""
import numpy as np

from harness import Comparison

import edgefl.kernels as K

from kernel_cases.topk import numpy_topk_ef_

CLIP = 1.0      # L1 bound C
EPSILON = 1.0   # per-update privacy budget; Laplace scale b = C / epsilon
TARGETS = {10**6: 3.0}


def edgefl_pipeline(x, residual, k, rng):
    K.clip_l1_(x, CLIP)
    K.laplace_(x, CLIP / EPSILON, rng)
    return K.topk_ef_(residual, x, k)


def numpy_pipeline(x, residual, k, rng):
    norm = np.abs(x).sum()
    if norm > CLIP:
        x *= CLIP / norm
    x += rng.laplace(0.0, CLIP / EPSILON, x.shape[0])
    return numpy_topk_ef_(residual, x, k)


def comparisons(sizes):
    for n in sizes:
        k = max(1, n // 100)
        data = np.random.default_rng(n)
        gradient = (data.standard_normal(n, dtype=np.float32) * 1e-2)
        start = np.zeros(n, np.float32)
        x, residual = gradient.copy(), start.copy()  # the harness warms up before any setup

        def reset(x=x, residual=residual, gradient=gradient, start=start):
            np.copyto(x, gradient)
            np.copyto(residual, start)

        ours, theirs = np.random.default_rng(1), np.random.default_rng(1)
        yield Comparison(
            "pipeline clip+noise+topk_ef", n,
            lambda x=x, r=residual, k=k, g=ours: edgefl_pipeline(x, r, k, g),
            lambda x=x, r=residual, k=k, g=theirs: numpy_pipeline(x, r, k, g),
            setup=reset, min_ratio=TARGETS.get(n), note=f"L1 clip, Laplace, k={k}")
