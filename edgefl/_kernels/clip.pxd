# Declarations of the clip kernels' C helpers (clip_impl.h); codec's ternary quantizer shares them.
cdef extern from "clip_impl.h" nogil:
    double edgefl_sum_squares(const float *x, size_t n)
    double edgefl_sum_abs(const float *x, size_t n)
    void edgefl_scale(float *x, size_t n, float factor)
    void edgefl_scale_wide(float *x, size_t n, double factor)
