# Declarations of the fused SGD kernel: the C loops of sgd_impl.h and the SGDState buffers.
from edgefl._kernels._typedefs cimport float32_t, int32_t, intp_t


cdef extern from "sgd_impl.h" nogil:
    const int EDGEFL_TILE
    int edgefl_baseline_only
    intp_t edgefl_padded(intp_t n)
    void edgefl_matmul(intp_t M, intp_t N, intp_t K,
                       const float32_t *A, intp_t a_rs, intp_t a_cs,
                       const float32_t *B, intp_t ldb, const float32_t *bias,
                       int relu, float32_t *C, intp_t ldc, float32_t *pack)
    double edgefl_softmax_xent(intp_t m, intp_t c, float32_t *Z, intp_t ldz, const int32_t *y)
    void edgefl_column_sums(intp_t m, intp_t n, const float32_t *G, intp_t ldg, float32_t *out)
    void edgefl_transpose(intp_t rows, intp_t cols, const float32_t *W, float32_t *T, intp_t ldt)
    void edgefl_relu_backward(intp_t m, intp_t n, float32_t *D, const float32_t *H, intp_t ld)
    void edgefl_sgd_update(intp_t rows, intp_t cols, float32_t *P, float32_t *G, intp_t ldg,
                           const float32_t *R, float32_t *V, float lr, float momentum,
                           float decay, float mu)


cdef class SGDState:
    cdef readonly tuple sizes
    cdef readonly Py_ssize_t max_batch
    cdef readonly tuple velocity
    # Owns every buffer the pointers below point into.
    cdef list _arrays
    cdef Py_ssize_t n_layers
    # Per layer l (n_layers entries; width/padded have n_layers + 1): input width[l],
    # output width[l + 1]; padded[l] rounds width[l] up to whole register tiles.
    cdef intp_t *width
    cdef intp_t *padded
    cdef float32_t **outputs      # max_batch x padded[l + 1]: ReLU output, logits for the last
    cdef float32_t **deltas       # gradient w.r.t. outputs[l]; the last one is outputs[-1] itself
    cdef float32_t **grad_w       # width[l] x padded[l + 1]
    cdef float32_t **grad_b       # padded[l + 1]
    cdef float32_t **velocity_w
    cdef float32_t **velocity_b
    cdef float32_t *transposed    # one layer's W transposed, for back-propagating through it
    cdef float32_t *pack          # one partial tile of a right-hand factor
    cdef int32_t *labels          # max_batch labels, checked and narrowed
    # The caller's arrays for the step in progress (set after validation).
    cdef float32_t **w
    cdef float32_t **b
    cdef const float32_t **w_ref
    cdef const float32_t **b_ref

    cdef float32_t *_keep(self, object array)
    cdef float32_t *_scratch(self, Py_ssize_t n)
