"""Norm clipping in place, in NumPy: the twin of the compiled ``clip`` kernels.

The norm is accumulated in double in the compiled kernel's lane order (``clip_impl.h``): element i
of the first ``n - n % LANES`` goes to lane ``i % LANES``, each lane sums in index order, then the
lanes are added in order, then the tail. A reduction over axis 0 of a C-contiguous
``(rows, LANES)`` block adds row after row, which is exactly one lane per column, so the results
are bit-identical to the compiled backend.
"""
import math

import numpy as np

from edgefl._kernels.checks.arrays import writeable_float32
from edgefl._kernels.checks.clip import check_bound, raise_non_finite
from edgefl._kernels.docs import document

#: Lanes of the double accumulator; must equal EDGEFL_LANES in clip_impl.h.
LANES = 32
# Rows per block: bounds the float64 temporary at 2 MiB whatever the size of x.
_BLOCK_ROWS = 8192
# Shrinks the clip factor so float32 rounding can never push the clipped norm above the bound.
_SHRINK = 1.0 - 2.0**-22


def lane_sum(terms):
    """Sum float64 ``terms`` (1-D) in the compiled kernels' lane order.

    Parameters
    ----------
    terms : numpy.ndarray
        float64 values to add (squares or magnitudes of float32 values, which are exact).

    Returns
    -------
    float
        The sum, bit-identical to ``edgefl_sum_squares`` / ``edgefl_sum_abs`` in C.
    """
    return _lane_sum_of(terms, lambda block: block)


def _lane_sum_of(x, term):
    """The lane-ordered sum of ``term(x as float64)``, one bounded block of rows at a time."""
    n = x.shape[0]
    body = n - n % LANES
    lanes = np.zeros(LANES)
    step = _BLOCK_ROWS * LANES
    for start in range(0, body, step):
        rows = term(x[start:min(start + step, body)].astype(np.float64)).reshape(-1, LANES)
        # the previous lane totals go first, so each column keeps adding in index order
        lanes = np.add.reduce(np.concatenate((lanes[None, :], rows)), axis=0)
    total = 0.0
    for value in lanes.tolist() + term(x[body:].astype(np.float64)).tolist():
        total += value
    return total


def _clip(x, max_norm, term, root):
    flat = writeable_float32(x, "clip that array")
    bound = check_bound(max_norm)
    norm = root(_lane_sum_of(flat, term)) if flat.shape[0] else 0.0
    if not math.isfinite(norm):
        raise_non_finite(flat)
    if norm > bound:
        factor = bound / norm * _SHRINK
        if factor >= float(np.finfo(np.float32).tiny):  # compared in double, as in C
            np.multiply(flat, np.float32(factor), out=flat)
        else:  # below float32's normal range: scale in double, as the compiled kernel does
            flat[...] = flat.astype(np.float64) * factor
    return norm


def clip_l2_(x, max_norm):
    return _clip(x, max_norm, np.square, math.sqrt)


def clip_l1_(x, max_norm):
    return _clip(x, max_norm, np.abs, float)


document(clip_l2_, clip_l1_)
