# Declarations of the top-k kernels' C passes (topk_impl.h), for topk.pyx and any kernel that
# selects coordinates by magnitude.
from edgefl._kernels._typedefs cimport uint32_t, uint64_t


cdef extern from "topk_impl.h" nogil:
    enum:
        EDGEFL_TOPK_OVERFLOW
        EDGEFL_TOPK_SHIFT
        EDGEFL_TOPK_BINS
    uint32_t edgefl_magnitude_key(float v)
    int edgefl_lowest_bit(uint64_t word)
    int edgefl_topk_histogram(const float *x, const float *u, size_t n, Py_ssize_t *counts)
    size_t edgefl_topk_collect(const float *x, size_t n, uint32_t lowest, uint32_t *candidates,
                               size_t capacity, uint32_t *largest)
    size_t edgefl_topk_accumulate_collect(float *r, const float *u, size_t n, uint32_t lowest,
                                          uint32_t *candidates, size_t capacity)
    uint32_t edgefl_max_key_sum(const float *r, const float *u, size_t n)
    void edgefl_topk_sample_keys(const float *x, const float *u, size_t n, size_t samples,
                                 uint32_t *keys)
    size_t edgefl_count_above(const float *x, size_t n, uint32_t threshold, uint32_t *largest)
    void edgefl_collect_above(const float *x, size_t n, uint32_t threshold, uint32_t *idx,
                              float *vals)
