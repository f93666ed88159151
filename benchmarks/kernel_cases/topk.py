"""Top-k family against the NumPy idioms a device would otherwise run, k = n/100.

* ``topk``: ``np.argpartition(np.abs(x), n - k)[n - k:]``, sort the indices, gather the values.
* ``topk_ef_``: ``r += u``, the same argpartition top-k of ``r``, gather, ``r[idx] = 0``, starting
  from a residual that has been through a few rounds of error feedback (values pile up just
  below the selection threshold, which is what makes this harder than plain top-k).
* ``threshold_select``: ``np.flatnonzero(np.abs(x) > tau)`` and a gather, tau picking about 1%.
* ``randomk``: ``np.sort(Generator.choice(n, k, replace=False))`` (a different sampler: NumPy's is
  not a documented, fixed algorithm, so it cannot serve devices that must agree; shown for scale).
"""
import numpy as np

from harness import Comparison

import edgefl.kernels as K

#: Minimum speed-ups (NumPy time / edgefl time) asked for, by kernel and size.
TARGETS = {
    ("topk", 10**6): 1.3, ("topk", 10**7): 3.0,
    ("topk_ef_", 10**6): 1.1, ("topk_ef_", 10**7): 2.0,
}
ROUNDS_BEFORE = 5  # error-feedback rounds that shape the starting residual


def numpy_topk(x, k):
    n = x.shape[0]
    idx = np.argpartition(np.abs(x), n - k)[n - k:]
    idx.sort()
    return idx, x[idx]


def numpy_topk_ef_(r, u, k):
    r += u
    idx, vals = numpy_topk(r, k)
    r[idx] = 0.0
    return idx, vals


def comparisons(sizes):
    for n in sizes:
        k = max(1, n // 100)
        rng = np.random.default_rng(n)
        x = rng.standard_normal(n, dtype=np.float32)
        yield Comparison("topk", n, lambda x=x, k=k: K.topk(x, k),
                         lambda x=x, k=k: numpy_topk(x, k),
                         min_ratio=TARGETS.get(("topk", n)), note=f"k={k}, gaussian")

        residual = np.zeros(n, np.float32)
        for _ in range(ROUNDS_BEFORE):
            numpy_topk_ef_(residual, rng.standard_normal(n, dtype=np.float32), k)
        update = rng.standard_normal(n, dtype=np.float32)
        start, work = residual, residual.copy()  # the harness warms up before any setup
        yield Comparison("topk_ef_", n, lambda w=work, u=update, k=k: K.topk_ef_(w, u, k),
                         lambda w=work, u=update, k=k: numpy_topk_ef_(w, u, k),
                         setup=lambda w=work, s=start: np.copyto(w, s),
                         min_ratio=TARGETS.get(("topk_ef_", n)),
                         note=f"k={k}, after {ROUNDS_BEFORE} rounds")

        tau = float(np.quantile(np.abs(x), 0.99))
        yield Comparison("threshold_select", n, lambda x=x, t=tau: K.threshold_select(x, t),
                         lambda x=x, t=tau: (lambda i: (i, x[i]))(np.flatnonzero(np.abs(x) > t)),
                         note="tau at the 99th percentile")

        sampler = np.random.default_rng(12345)  # made once: its construction is not timed
        yield Comparison("randomk", n, lambda n=n, k=k: K.randomk(n, k, 12345),
                         lambda n=n, k=k, g=sampler: np.sort(g.choice(n, k, replace=False)),
                         note=f"k={k}; NumPy's sampler differs")
