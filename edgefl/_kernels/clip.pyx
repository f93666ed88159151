"""Norm clipping in place: the sensitivity bound of differentially private updates.

``clip_l2_`` and ``clip_l1_`` scale a float32 array so that its norm is at most ``max_norm`` and
return the norm it had before. The norm is accumulated in double in a fixed lane order (see
``clip_impl.h``) that the NumPy twin reproduces, so both backends agree bit for bit.

The guarantee a privacy accountant needs is that the clipped array's exact norm never exceeds
``max_norm``. Scaling by the float32-rounded factor ``max_norm / norm`` alone can overshoot by an
ulp, so the factor is shrunk by 2**-22 (relative) before rounding: every product then stays below
its exact value and the clipped norm stays below ``max_norm``. A factor below float32's normal range
(a norm over 2**126 times the bound) is applied in double instead, where it keeps its precision.
(Products that land in float32's subnormal range carry an absolute error up to 2**-150 each, which
only matters for bounds below about 1e-30.)
"""
cimport numpy as cnp
from libc.float cimport FLT_MIN
from libc.math cimport isfinite, sqrt

import numpy as np


from edgefl._kernels._arrays cimport writeable_float32_fast
from edgefl._kernels._typedefs cimport float32_t, float64_t
from edgefl._kernels.clip cimport (
    edgefl_scale,
    edgefl_scale_wide,
    edgefl_sum_abs,
    edgefl_sum_squares,
)

# Shrinks the clip factor by 2 float32 ulps' worth so rounding can never push a norm above the bound.
cdef float64_t _SHRINK = 1.0 - 2.0 ** -22


cdef inline void _scale(float32_t *data, size_t n, float64_t factor) noexcept nogil:
    if factor >= FLT_MIN:
        edgefl_scale(data, n, <float32_t>factor)
    else:
        edgefl_scale_wide(data, n, factor)


cnp.import_array()


cdef float64_t _check_bound(object max_norm) except -1:
    cdef float64_t bound
    if type(max_norm) is float:
        bound = max_norm
    else:
        try:
            bound = max_norm
        except TypeError:
            raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}") from None
    if not (isfinite(bound) and bound > 0.0):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm!r}")
    return bound


cdef _raise_non_finite(object x):
    flat = x.reshape(-1)
    i = int(np.flatnonzero(~np.isfinite(flat))[0])
    raise ValueError(
        f"x contains a non-finite value ({flat[i]} at flat index {i}); x is left unchanged. "
        "Clip only finite updates: check the training step that produced it"
    )


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

    Notes
    -----
    L2 clipping bounds the L2 sensitivity: pair it with Gaussian noise. Laplace noise needs
    :func:`clip_l1_`.
    """
    cdef cnp.ndarray a = writeable_float32_fast(x, "clip that array")
    cdef float64_t bound = _check_bound(max_norm)
    cdef size_t n = cnp.PyArray_SIZE(a)
    cdef float32_t *data = <float32_t *>cnp.PyArray_DATA(a)
    cdef float64_t norm = 0.0
    with nogil:
        if n:
            norm = sqrt(edgefl_sum_squares(data, n))
            # A NaN or Inf anywhere makes the sum non-finite (finite float32 squares cannot
            # overflow a double), so the sum itself is the flag and x stays untouched.
            if isfinite(norm) and norm > bound:
                _scale(data, n, bound / norm * _SHRINK)
    if not isfinite(norm):
        _raise_non_finite(x)
    return norm


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

    Notes
    -----
    After clipping to C, adding or removing one update moves a sum by at most C in L1 norm
    (replacing one: 2C); Laplace noise is calibrated to that L1 sensitivity, never to an L2 bound.
    """
    cdef cnp.ndarray a = writeable_float32_fast(x, "clip that array")
    cdef float64_t bound = _check_bound(max_norm)
    cdef size_t n = cnp.PyArray_SIZE(a)
    cdef float32_t *data = <float32_t *>cnp.PyArray_DATA(a)
    cdef float64_t norm = 0.0
    with nogil:
        if n:
            norm = edgefl_sum_abs(data, n)
            if isfinite(norm) and norm > bound:
                _scale(data, n, bound / norm * _SHRINK)
    if not isfinite(norm):
        _raise_non_finite(x)
    return norm
