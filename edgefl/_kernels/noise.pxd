# Declarations of the noise kernels' C helpers (noise_impl.h).
from libc.stdint cimport uint32_t

cdef extern from "noise_impl.h" nogil:
    void edgefl_add_signed_scaled(float *x, const float *draws, const uint32_t *signs, size_t n,
                                  float scale)
    void edgefl_add_scaled(float *x, const float *draws, size_t n, float scale)
