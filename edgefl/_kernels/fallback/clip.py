"""Norm clipping in place, in NumPy: the twin of the compiled ``clip`` kernels.

The norm is accumulated in double in the compiled kernel's lane order (``clip_impl.h``): element i
of the first ``n - n % LANES`` goes to lane ``i % LANES``, each lane sums in index order, then the
lanes are added in order, then the tail. A reduction over axis 0 of a C-contiguous
``(rows, LANES)`` block adds row after row, which is exactly one lane per column, so the results
are bit-identical to the compiled backend.
"""
import math

import numpy as np

from edgefl._kernels.fallback.arrays import writeable_float32

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


def _check_bound(max_norm):
    if isinstance(max_norm, (str, bytes, bytearray)):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}")
    try:
        bound = float(max_norm)
    except (TypeError, ValueError):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}") from None
    if not (math.isfinite(bound) and bound > 0.0):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm!r}")
    return bound


def _raise_non_finite(flat):
    i = int(np.flatnonzero(~np.isfinite(flat))[0])
    raise ValueError(
        f"x contains a non-finite value ({flat[i]} at flat index {i}); x is left unchanged. "
        "Clip only finite updates: check the training step that produced it"
    )


def _clip(x, max_norm, term, root):
    flat = writeable_float32(x, "clip that array")
    bound = _check_bound(max_norm)
    norm = root(_lane_sum_of(flat, term)) if flat.shape[0] else 0.0
    if not math.isfinite(norm):
        _raise_non_finite(flat)
    if norm > bound:
        factor = bound / norm * _SHRINK
        if factor >= float(np.finfo(np.float32).tiny):  # compared in double, as in C
            np.multiply(flat, np.float32(factor), out=flat)
        else:  # below float32's normal range: scale in double, as the compiled kernel does
            flat[...] = flat.astype(np.float64) * factor
    return norm


def clip_l2_(x, max_norm):
    """Scale ``x`` in place so that its L2 norm is at most ``max_norm``.

    Parameters
    ----------
    x : numpy.ndarray
        float32, C-contiguous, writeable, any shape (the norm is over all elements).
    max_norm : float
        The bound, finite and > 0.

    Returns
    -------
    float
        The L2 norm of ``x`` before clipping, accumulated in double.

    Raises
    ------
    TypeError
        ``x`` is not a float32 ndarray, or ``max_norm`` is not a number.
    ValueError
        ``x`` is non-contiguous or read-only, contains NaN or Inf (``x`` is left unchanged), or
        ``max_norm`` is not finite and positive.
    """
    return _clip(x, max_norm, np.square, math.sqrt)


def clip_l1_(x, max_norm):
    """Scale ``x`` in place so that its L1 norm is at most ``max_norm``.

    Parameters
    ----------
    x : numpy.ndarray
        float32, C-contiguous, writeable, any shape (the norm is over all elements).
    max_norm : float
        The bound, finite and > 0.

    Returns
    -------
    float
        The L1 norm of ``x`` before clipping, accumulated in double.

    Raises
    ------
    TypeError
        ``x`` is not a float32 ndarray, or ``max_norm`` is not a number.
    ValueError
        ``x`` is non-contiguous or read-only, contains NaN or Inf (``x`` is left unchanged), or
        ``max_norm`` is not finite and positive.
    """
    return _clip(x, max_norm, np.abs, float)
