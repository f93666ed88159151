# Declarations of the codec's C helpers (codec_impl.h).
from libc.stdint cimport uint16_t

cdef extern from "codec_impl.h" nogil:
    uint16_t edgefl_float_to_half(float f)
    float edgefl_half_to_float(uint16_t h)
    int edgefl_ctz8(unsigned int byte)
    int edgefl_popcount8(unsigned int byte)
