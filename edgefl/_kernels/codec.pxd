# Declarations of the codec's C helpers (codec_impl.h).
from libc.stdint cimport int8_t, uint8_t, uint16_t

cdef extern from "codec_impl.h" nogil:
    int edgefl_ctz8(unsigned int byte)
    int edgefl_popcount8(unsigned int byte)
    bint edgefl_any_non_finite(const float *x, size_t n)
    float edgefl_max_abs(const float *x, size_t n)
    void edgefl_quantize_int8(const float *x, size_t n, float scale, int8_t *codes)
    void edgefl_pack_ternary(const float *x, size_t n, uint8_t *out)
    bint edgefl_dequantize_int8(const int8_t *codes, size_t n, float scale, float *out)
    bint edgefl_quantize_f16(const float *x, size_t n, uint16_t *halves)
    bint edgefl_dequantize_f16(const uint16_t *halves, size_t n, float *out)
