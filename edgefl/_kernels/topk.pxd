# Declarations of the top-k kernels' C-level helpers, for other kernels that select coordinates.
from libc.string cimport memcpy

from edgefl._kernels._typedefs cimport float32_t, intp_t, uint32_t, uint64_t


cdef inline uint32_t magnitude_key(float32_t v) noexcept nogil:
    """``abs(v)`` as an unsigned integer that sorts like the magnitude.

    Clearing the sign bit of an IEEE-754 float leaves a non-negative float whose bit pattern, read
    as an unsigned integer, orders exactly as its value (subnormals included, ``-0.0`` -> 0);
    NaN and Inf map to keys >= 0x7f800000.
    """
    cdef uint32_t bits
    memcpy(&bits, &v, sizeof(bits))
    return bits & 0x7fffffff


cdef int topk_into(const float32_t* x, intp_t n, intp_t k,
                   uint32_t* out_idx, float32_t* out_vals) noexcept nogil
