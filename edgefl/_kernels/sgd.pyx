"""Fused minibatch SGD steps for softmax regression and small ReLU MLPs, in place, without the GIL.

One call runs the forward pass, the softmax cross-entropy, the backward pass and the update of
every layer, for every weight ``w``::

    g = grad(mean cross-entropy) + weight_decay * w + mu * (w - w_ref)
    v = momentum * v + g            (only when momentum > 0; v lives in an SGDState)
    w = w - lr * v                  (w = w - lr * g without momentum)

Weight decay applies to the weight matrices only; the FedProx proximal term to every parameter.
The pure-NumPy twin (``edgefl._kernels.fallback.sgd``) states the same math in a dozen lines and
is the oracle for this module; both agree within float32 rounding.

Why it is fast at edge sizes (64 -> 32 -> 10, batch 32): the arithmetic is ~160k multiply-adds,
a few microseconds, so per-call overhead decides. Arguments are checked through NumPy's C API
(no typed-memoryview acquisition), an :class:`SGDState` holds every scratch buffer so a step
allocates nothing, and the products run in register tiles (``sgd_impl.h``) on buffers padded to
whole vectors. Matrix products accumulate in float32, like NumPy's; the loss in double.

Errors: the arguments are checked with cheap C-level tests first; when one fails, the shared
validation (:mod:`edgefl._kernels.checks.sgd`, which the twin runs too) raises its error on the
same arguments, so both backends report a bad argument with the same words.
"""
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cimport numpy as cnp
import operator

import numpy as np

from edgefl._kernels._random cimport bitgen_t, random_interval
from edgefl._kernels._typedefs cimport float32_t, int32_t, intp_t
from edgefl._kernels.checks.sgd import (
    TrainingDiverged, check_architecture, check_epochs_args, check_mlp_args, check_softmax_args,
    divergence_error,
)
from edgefl._kernels.docs import document

cnp.import_array()

#: Raised for a non-finite batch loss; one class for both backends.


cdef struct Hyperparameters:
    double lr
    double momentum
    double weight_decay
    double mu


cdef class SGDState:
    """Momentum buffers and scratch memory for repeated steps of one architecture.

    Documented in full in ``edgefl/_kernels/docs.py`` (``DOCS["SGDState"]``): a ``cdef
    class``'s docstring cannot be assigned at import.
    """

    def __cinit__(self, sizes, max_batch):
        self.sizes, self.max_batch = check_architecture(sizes, max_batch)
        cdef Py_ssize_t n = len(self.sizes) - 1, l
        self.n_layers = n
        self.width = <intp_t *>PyMem_Calloc(n + 1, sizeof(intp_t))
        self.padded = <intp_t *>PyMem_Calloc(n + 1, sizeof(intp_t))
        self.outputs = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.deltas = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.grad_w = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.grad_b = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.velocity_w = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.velocity_b = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.w = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.b = <float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.w_ref = <const float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        self.b_ref = <const float32_t **>PyMem_Calloc(n, sizeof(float32_t *))
        if (not self.width or not self.padded or not self.outputs or not self.deltas
                or not self.grad_w or not self.grad_b or not self.velocity_w
                or not self.velocity_b or not self.w or not self.b or not self.w_ref
                or not self.b_ref):
            raise MemoryError("SGDState: out of memory for the layer tables")
        for l in range(n + 1):
            self.width[l] = self.sizes[l]
            self.padded[l] = edgefl_padded(self.sizes[l])
        self._arrays = []
        velocity = []
        for l in range(n):
            v_w = np.zeros((self.width[l], self.width[l + 1]), np.float32)
            v_b = np.zeros(self.width[l + 1], np.float32)
            velocity.append((v_w, v_b))
            self.velocity_w[l] = self._keep(v_w)
            self.velocity_b[l] = self._keep(v_b)
            self.outputs[l] = self._scratch(self.max_batch * self.padded[l + 1])
            # The gradient w.r.t. the logits overwrites the logits; hidden layers get their own.
            self.deltas[l] = (self.outputs[l] if l == n - 1
                              else self._scratch(self.max_batch * self.padded[l + 1]))
            self.grad_w[l] = self._scratch(self.width[l] * self.padded[l + 1])
            self.grad_b[l] = self._scratch(self.padded[l + 1])
        self.velocity = tuple(velocity)
        self.transposed = self._scratch(
            max([self.width[l + 1] * self.padded[l] for l in range(1, n)], default=1))
        self.pack = self._scratch(max(self.max_batch, max(self.sizes)) * EDGEFL_TILE)
        labels = np.zeros(self.max_batch, np.int32)
        self._arrays.append(labels)
        self.labels = <int32_t *>cnp.PyArray_DATA(labels)

    def __dealloc__(self):
        PyMem_Free(self.width)
        PyMem_Free(self.padded)
        PyMem_Free(self.outputs)
        PyMem_Free(self.deltas)
        PyMem_Free(self.grad_w)
        PyMem_Free(self.grad_b)
        PyMem_Free(self.velocity_w)
        PyMem_Free(self.velocity_b)
        PyMem_Free(self.w)
        PyMem_Free(self.b)
        PyMem_Free(<void *>self.w_ref)
        PyMem_Free(<void *>self.b_ref)

    cdef float32_t *_keep(self, object array):
        self._arrays.append(array)
        return <float32_t *>cnp.PyArray_DATA(<cnp.ndarray>array)

    cdef float32_t *_scratch(self, Py_ssize_t n):
        # Zeroed (free for fresh pages), so no buffer ever holds stale memory.
        return self._keep(np.zeros(n, np.float32))

    def reset(self):
        """Zero the momentum buffers, e.g. when a new global model replaces the local one."""
        for v_w, v_b in self.velocity:
            v_w.fill(0.0)
            v_b.fill(0.0)

    def __reduce__(self):
        # Pickles as its architecture and velocity, so a trainer can checkpoint momentum; the
        # scratch buffers are rebuilt.
        return SGDState, (self.sizes, self.max_batch), self.velocity

    def __setstate__(self, velocity):
        for (v_w, v_b), (saved_w, saved_b) in zip(self.velocity, velocity):
            np.copyto(v_w, saved_w)
            np.copyto(v_b, saved_b)

    def __repr__(self):
        return f"SGDState(sizes={self.sizes}, max_batch={self.max_batch})"


def softmax_sgd_step_(W, b, X, y, lr, *, momentum=0.0, weight_decay=0.0, mu=0.0, W_ref=None,
                      b_ref=None, state=None):
    cdef Hyperparameters h
    cdef intp_t m = 0
    cdef SGDState s = None
    ref = None if W_ref is None and b_ref is None else ((W_ref, b_ref),)
    if _hyperparameters_ok(lr, momentum, weight_decay, mu, &h):
        s = _prepare(((W, b),), ref, X, y, &h, state, &m)
    if s is None:
        check_softmax_args(W, b, X, y, lr, momentum, weight_decay, mu, W_ref, b_ref, state,
                                  state_type=SGDState)
        raise _disagreement()
    return _run_step(s, X, m, &h)


def mlp_sgd_step_(layers, X, y, lr, *, momentum=0.0, weight_decay=0.0, mu=0.0, ref=None,
                  state=None):
    cdef Hyperparameters h
    cdef intp_t m = 0
    cdef SGDState s = None
    if _hyperparameters_ok(lr, momentum, weight_decay, mu, &h):
        s = _prepare(layers, ref, X, y, &h, state, &m)
    if s is None:
        check_mlp_args(layers, X, y, lr, momentum, weight_decay, mu, ref, state,
                              state_type=SGDState)
        raise _disagreement()
    return _run_step(s, X, m, &h)


def mlp_sgd_epochs_(layers, X, y, lr, *, rng, epochs=1, batch_size=32, momentum=0.0,
                    weight_decay=0.0, mu=0.0, ref=None, state=None):
    cdef Hyperparameters h
    cdef SGDState s = None
    cdef intp_t n = 0, n_epochs = 0, batch = 0
    cdef bitgen_t *bitgen = NULL
    cdef cnp.ndarray labels = None
    if (_hyperparameters_ok(lr, momentum, weight_decay, mu, &h)
            and _positive_ok(epochs, &n_epochs) and _positive_ok(batch_size, &batch)
            and _float32_ok(X, 2, False) and cnp.PyArray_DIMS(<cnp.ndarray>X)[0] >= 1):
        n = cnp.PyArray_DIMS(<cnp.ndarray>X)[0]
        batch = min(batch, n)
        bitgen = _generator_bitgen(rng)
        s = _epoch_state(layers, ref, &h, state, batch)
    if s is not None and cnp.PyArray_DIMS(<cnp.ndarray>X)[1] == s.width[0]:
        labels = np.empty(n, np.int32)
        if not _labels_to_int32(y, n, s.width[s.n_layers],
                                <int32_t *>cnp.PyArray_DATA(labels)):
            s = None
    else:
        s = None
    if s is None or bitgen == NULL:
        check_epochs_args(layers, X, y, lr, rng, epochs, batch_size, momentum,
                                 weight_decay, mu, ref, state, state_type=SGDState)
        raise _disagreement()
    cdef cnp.ndarray order = np.empty(n, np.intp)
    cdef cnp.ndarray rows = np.empty(batch * s.width[0], np.float32)
    cdef double loss = _run_epochs(
        s, <const float32_t *>cnp.PyArray_DATA(<cnp.ndarray>X), n,
        <const int32_t *>cnp.PyArray_DATA(labels), <intp_t *>cnp.PyArray_DATA(order),
        <float32_t *>cnp.PyArray_DATA(rows), n_epochs, batch, &h, bitgen, rng.bit_generator.lock)
    if not isfinite(loss):
        raise divergence_error(loss, h.lr, within_epochs=True)
    return loss


cdef double _run_epochs(SGDState s, const float32_t *X, intp_t n, const int32_t *labels,
                        intp_t *order, float32_t *rows, intp_t epochs, intp_t batch,
                        const Hyperparameters *h, bitgen_t *bitgen, object lock):
    """The epochs on validated arguments: the mean batch loss of the last, or the first
    non-finite batch loss (training stops there)."""
    cdef intp_t d = s.width[0], e, i, j, start, m, r, swap
    cdef int32_t *step_labels = s.labels
    cdef double loss = 0, total = 0
    cdef intp_t steps = 0
    with lock, nogil:
        for e in range(epochs):
            for i in range(n):
                order[i] = i
            for i in range(n - 1, 0, -1):  # Generator.shuffle's loop, draw for draw
                j = <intp_t>random_interval(bitgen, <uint64_t>i)
                swap = order[i]
                order[i] = order[j]
                order[j] = swap
            total = 0
            steps = 0
            start = 0
            while start < n:
                m = min(batch, n - start)
                for r in range(m):
                    memcpy(rows + r * d, X + order[start + r] * d, d * sizeof(float32_t))
                    step_labels[r] = labels[order[start + r]]
                loss = _step(s, rows, m, h)
                if not isfinite(loss):
                    return loss
                total += loss
                steps += 1
                start += m
    return total / steps


cdef SGDState _epoch_state(object layers, object ref, Hyperparameters *h, object state,
                           intp_t batch):
    """The state for :func:`mlp_sgd_epochs_`, pointed at the caller's layers, else None."""
    cdef SGDState s = _bound_state(layers, ref, h, state, batch)
    return s if s is not None and s.max_batch >= batch else None


cdef bitgen_t *_generator_bitgen(object rng):
    """The BitGenerator of a numpy.random.Generator, else NULL."""
    if not isinstance(rng, np.random.Generator):
        return NULL
    capsule = rng.bit_generator.capsule
    if not PyCapsule_IsValid(capsule, "BitGenerator"):
        return NULL
    return <bitgen_t *>PyCapsule_GetPointer(capsule, "BitGenerator")


cdef bint _positive_ok(object value, intp_t *out):
    """An integer from 1 to sys.maxsize, by the shared checks' operator.index rule."""
    try:
        value = operator.index(value)
    except TypeError:
        return False
    if not 1 <= value <= PY_SSIZE_T_MAX:
        return False
    out[0] = value
    return True


cdef object _run_step(SGDState s, object X, intp_t m, Hyperparameters *h):
    cdef const float32_t *x = <const float32_t *>cnp.PyArray_DATA(<cnp.ndarray>X)
    cdef double loss
    with nogil:
        loss = _step(s, x, m, h)
    if not isfinite(loss):
        raise divergence_error(loss, h.lr)
    return loss


cdef double _step(SGDState s, const float32_t *X, intp_t m,
                  const Hyperparameters *h) noexcept nogil:
    """Forward, loss, backward and update on validated arguments; the loss before the update.

    A non-finite loss returns before anything is written to the caller's arrays.
    """
    cdef intp_t n = s.n_layers, l
    cdef const float32_t *inputs = X
    cdef intp_t ld_inputs = s.width[0]
    cdef double loss
    for l in range(n):
        edgefl_matmul(m, s.width[l + 1], s.width[l], inputs, ld_inputs, 1, s.w[l],
                      s.width[l + 1], s.b[l], l < n - 1, s.outputs[l], s.padded[l + 1], s.pack)
        inputs = s.outputs[l]
        ld_inputs = s.padded[l + 1]
    loss = edgefl_softmax_xent(m, s.width[n], s.outputs[n - 1], s.padded[n], s.labels)
    if not isfinite(loss):
        return loss
    for l in range(n - 1, -1, -1):
        if l == 0:
            inputs = X
            ld_inputs = s.width[0]
        else:
            inputs = s.outputs[l - 1]
            ld_inputs = s.padded[l]
        # grad W = inputs^T delta: the left factor is `inputs` read by columns.
        edgefl_matmul(s.width[l], s.width[l + 1], m, inputs, 1, ld_inputs, s.deltas[l],
                      s.padded[l + 1], NULL, 0, s.grad_w[l], s.padded[l + 1], s.pack)
        edgefl_column_sums(m, s.width[l + 1], s.deltas[l], s.padded[l + 1], s.grad_b[l])
        if l > 0:
            # delta of the layer below = (delta W^T) masked by its ReLU, with W before the update.
            edgefl_transpose(s.width[l], s.width[l + 1], s.w[l], s.transposed, s.padded[l])
            edgefl_matmul(m, s.width[l], s.width[l + 1], s.deltas[l], s.padded[l + 1], 1,
                          s.transposed, s.padded[l], NULL, 0, s.deltas[l - 1], s.padded[l],
                          s.pack)
            edgefl_relu_backward(m, s.padded[l], s.deltas[l - 1], s.outputs[l - 1], s.padded[l])
        edgefl_sgd_update(s.width[l], s.width[l + 1], s.w[l], s.grad_w[l], s.padded[l + 1],
                          s.w_ref[l], s.velocity_w[l], <float>h.lr, <float>h.momentum,
                          <float>h.weight_decay, <float>h.mu)
        edgefl_sgd_update(1, s.width[l + 1], s.b[l], s.grad_b[l], s.padded[l + 1], s.b_ref[l],
                          s.velocity_b[l], <float>h.lr, <float>h.momentum, 0.0, <float>h.mu)
    return loss


cdef SGDState _prepare(object layers, object ref, object X, object y, Hyperparameters *h,
                       object state, intp_t *m):
    """The state to step with, pointed at the caller's arrays, with the labels copied in.

    Returns None when any argument is invalid: the caller then lets the shared checks say which.
    """
    cdef SGDState s
    if state is None and (h.momentum > 0 or not _float32_ok(X, 2, False)
                          or cnp.PyArray_DIMS(<cnp.ndarray>X)[0] < 1):
        return None
    s = _bound_state(layers, ref, h, state,
                     cnp.PyArray_DIMS(<cnp.ndarray>X)[0] if state is None else 0)
    if s is None:
        return None
    m[0] = _batch_rows(X, s)
    if m[0] < 1 or not _copy_labels(y, m[0], s):
        return None
    return s


cdef SGDState _bound_state(object layers, object ref, Hyperparameters *h, object state,
                           intp_t new_max_batch):
    """``state`` (or, if None, a new one for ``new_max_batch`` rows) pointed at the caller's
    layers; None if they do not fit it."""
    cdef SGDState s
    if state is None:
        sizes = _layer_sizes(layers)
        if sizes is None:
            return None
        s = SGDState(sizes, new_max_batch)
    elif isinstance(state, SGDState):
        s = <SGDState>state
    else:
        return None
    return s if _bind_layers(s, layers, ref, h.mu > 0) else None


cdef bint _bind_layers(SGDState s, object layers, object ref, bint proximal):
    """Check ``layers`` (and ``ref``) against the state's architecture; point the state at them."""
    cdef Py_ssize_t n = s.n_layers, l
    cdef float32_t *w_ref
    cdef float32_t *b_ref
    if not isinstance(layers, (list, tuple)) or len(layers) != n:
        return False
    if ref is None:
        if proximal:
            return False
    elif not isinstance(ref, (list, tuple)) or len(ref) != n:
        return False
    for l in range(n):
        if not _pair_ok(layers[l], s.width[l], s.width[l + 1], True, &s.w[l], &s.b[l]):
            return False
        s.w_ref[l] = NULL
        s.b_ref[l] = NULL
        if ref is not None:
            if not _pair_ok(ref[l], s.width[l], s.width[l + 1], False, &w_ref, &b_ref):
                return False
            if proximal:
                s.w_ref[l] = w_ref
                s.b_ref[l] = b_ref
    return True


cdef bint _pair_ok(object pair, intp_t n_in, intp_t n_out, bint writeable, float32_t **w,
                   float32_t **b):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return False
    W, bias = pair[0], pair[1]
    if not (_float32_ok(W, 2, writeable) and _float32_ok(bias, 1, writeable)):
        return False
    cdef cnp.npy_intp *w_dims = cnp.PyArray_DIMS(<cnp.ndarray>W)
    if (w_dims[0] != n_in or w_dims[1] != n_out
            or cnp.PyArray_DIMS(<cnp.ndarray>bias)[0] != n_out):
        return False
    w[0] = <float32_t *>cnp.PyArray_DATA(<cnp.ndarray>W)
    b[0] = <float32_t *>cnp.PyArray_DATA(<cnp.ndarray>bias)
    return True


cdef tuple _layer_sizes(object layers):
    """The widths (d, d_1, ..., c) that ``layers`` of float32 (W, b) pairs imply, else None.

    Only enough to build a state: :func:`_bind_layers` then checks every shape against it.
    """
    if not isinstance(layers, (list, tuple)) or not layers:
        return None
    for pair in layers:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and _float32_ok(pair[0], 2, True)):
            return None
    sizes = (layers[0][0].shape[0],) + tuple(pair[0].shape[1] for pair in layers)
    return sizes if min(sizes) >= 1 else None


cdef intp_t _batch_rows(object X, SGDState s):
    """Rows of X if it is a float32 (m, d) batch the state can take, else -1."""
    if not _float32_ok(X, 2, False):
        return -1
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(<cnp.ndarray>X)
    if dims[1] != s.width[0] or dims[0] < 1 or dims[0] > s.max_batch:
        return -1
    return dims[0]


cdef bint _copy_labels(object y, intp_t m, SGDState s):
    """Copy m integer labels into the state as int32, checking each is in [0, classes)."""
    return _labels_to_int32(y, m, s.width[s.n_layers], s.labels)


cdef bint _labels_to_int32(object y, intp_t m, intp_t classes, int32_t *out):
    """Copy m integer labels to ``out`` as int32, checking each is in [0, classes)."""
    if not cnp.PyArray_Check(y):
        return False
    cdef cnp.ndarray labels = <cnp.ndarray>y
    if (not cnp.PyArray_ISINTEGER(labels) or cnp.PyArray_NDIM(labels) != 1
            or cnp.PyArray_DIMS(labels)[0] != m):
        return False
    cdef int kind = cnp.PyArray_TYPE(labels)
    if not (cnp.PyArray_ISCARRAY_RO(labels) and (kind == cnp.NPY_INT64 or kind == cnp.NPY_INT32)):
        # Rare layouts and dtypes take one conversion; out-of-range values stay out of range.
        labels = np.ascontiguousarray(y, dtype=np.int64)
        kind = cnp.NPY_INT64
    cdef intp_t i
    cdef int64_t label
    cdef bint in_range = True
    cdef const int64_t *y64 = <const int64_t *>cnp.PyArray_DATA(labels)
    cdef const int32_t *y32 = <const int32_t *>cnp.PyArray_DATA(labels)
    for i in range(m):
        label = y64[i] if kind == cnp.NPY_INT64 else y32[i]
        in_range &= 0 <= label < classes
        out[i] = <int32_t>label
    return in_range


cdef bint _float32_ok(object a, int ndim, bint writeable):
    """A float32 array of ndim dimensions the kernel can use as is (see edgefl._kernels.checks.sgd)."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray array = <cnp.ndarray>a
    return (cnp.PyArray_TYPE(array) == cnp.NPY_FLOAT32 and cnp.PyArray_NDIM(array) == ndim
            and cnp.PyArray_ISCARRAY_RO(array)
            and (not writeable or cnp.PyArray_ISWRITEABLE(array)))


cdef bint _hyperparameters_ok(object lr, object momentum, object weight_decay, object mu,
                              Hyperparameters *h):
    return (_as_double(lr, &h.lr) and _as_double(momentum, &h.momentum)
            and _as_double(weight_decay, &h.weight_decay) and _as_double(mu, &h.mu)
            and isfinite(h.lr) and h.lr >= 0 and 0 <= h.momentum < 1
            and isfinite(h.weight_decay) and h.weight_decay >= 0 and isfinite(h.mu) and h.mu >= 0)


cdef bint _as_double(object value, double *out):
    if PyFloat_CheckExact(value):
        out[0] = PyFloat_AS_DOUBLE(value)
        return True
    try:
        out[0] = float(value)
    except (TypeError, ValueError):
        return False
    return True


def _use_baseline_product(bint enabled):
    """Run the 4-float baseline matrix product even where AVX2 is available; return the previous
    setting. For tests: it is the code a board without AVX2 (an ARM one) runs."""
    global edgefl_baseline_only
    previous = edgefl_baseline_only != 0
    edgefl_baseline_only = enabled
    return previous


cdef object _disagreement():
    return RuntimeError(
        "edgefl's compiled SGD step rejected arguments that its NumPy twin accepts; this is a "
        "bug in edgefl, please report it with the shapes and dtypes of the arguments")


document(softmax_sgd_step_, mlp_sgd_step_, mlp_sgd_epochs_)
