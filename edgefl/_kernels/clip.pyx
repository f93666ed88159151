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
from edgefl._kernels.checks.clip import check_bound, raise_non_finite
from edgefl._kernels._typedefs cimport float32_t, float64_t
from edgefl._kernels.clip cimport (
    edgefl_scale,
    edgefl_scale_wide,
    edgefl_sum_abs,
    edgefl_sum_squares,
)
from edgefl._kernels.docs import document

# Shrinks the clip factor by 2 float32 ulps' worth so rounding can never push a norm above the bound.
cdef float64_t _SHRINK = 1.0 - 2.0 ** -22


cdef inline void _scale(float32_t *data, size_t n, float64_t factor) noexcept nogil:
    if factor >= FLT_MIN:
        edgefl_scale(data, n, <float32_t>factor)
    else:
        edgefl_scale_wide(data, n, factor)


cnp.import_array()


def clip_l2_(x, max_norm):
    cdef cnp.ndarray a = writeable_float32_fast(x, "clip that array")
    cdef float64_t bound = check_bound(max_norm)
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
        raise_non_finite(x.reshape(-1))
    return norm


def clip_l1_(x, max_norm):
    cdef cnp.ndarray a = writeable_float32_fast(x, "clip that array")
    cdef float64_t bound = check_bound(max_norm)
    cdef size_t n = cnp.PyArray_SIZE(a)
    cdef float32_t *data = <float32_t *>cnp.PyArray_DATA(a)
    cdef float64_t norm = 0.0
    with nogil:
        if n:
            norm = edgefl_sum_abs(data, n)
            if isfinite(norm) and norm > bound:
                _scale(data, n, bound / norm * _SHRINK)
    if not isfinite(norm):
        raise_non_finite(x.reshape(-1))
    return norm


document(clip_l2_, clip_l1_)
