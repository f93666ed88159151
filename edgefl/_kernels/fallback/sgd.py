"""Fused minibatch SGD steps for softmax regression and small ReLU MLPs: the pure-NumPy twin.

Same names, arguments, validation and error messages as the compiled ``edgefl._kernels.sgd``; the
results agree within float32 rounding. The math lives in :func:`_loss_and_gradients`, which keeps
the dtype it is given, so the tests can check it against finite differences in float64.

One step, for every layer's weights ``w`` (``W`` and ``b`` of each layer)::

    g = grad(mean cross-entropy) + weight_decay * w + mu * (w - w_ref)
    v = momentum * v + g            (only when momentum > 0; v lives in an SGDState)
    w = w - lr * v                  (w = w - lr * g without momentum)

Weight decay applies to the weight matrices only, not to the biases (decaying a bias only shifts
the decision boundary towards the origin, it does not regularise). The FedProx proximal term
applies to every parameter, biases included, because it measures the distance of the whole model
from the round's global model (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020).
"""
import math
import operator
import sys

import numpy as np


class TrainingDiverged(ValueError, FloatingPointError):
    """A step met a non-finite batch loss, refused to update, and changed nothing.

    A ``FloatingPointError``, so a trainer can catch divergence apart from bad arguments, and a
    ``ValueError``, because the values it was given (the learning rate, the data, the weights)
    are what has to change.
    """


class SGDState:
    """Momentum buffers (and, in the compiled backend, scratch memory) for one architecture.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths from input to output: ``(d, c)`` for softmax regression, ``(64, 32, 10)``
        for a 64-32-10 MLP. At least two entries, each >= 1.
    max_batch : int
        The largest minibatch (rows of ``X``) a step with this state may take, >= 1.

    Attributes
    ----------
    sizes : tuple of int
        The layer widths the state was built for.
    max_batch : int
        The largest minibatch it accepts.
    velocity : tuple of (ndarray, ndarray)
        One ``(vW, vb)`` float32 pair per layer, shaped like ``(W, b)``, zero at first. The
        arrays are updated in place; write into them (or call :meth:`reset`) to change them.

    Notes
    -----
    A state belongs to one training thread: two steps must not use it at the same time.
    """

    def __init__(self, sizes, max_batch):
        self.sizes, self.max_batch = _check_architecture(sizes, max_batch)
        self.velocity = tuple(
            (np.zeros((n_in, n_out), np.float32), np.zeros(n_out, np.float32))
            for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:])
        )

    def reset(self):
        """Zero the momentum buffers, e.g. when a new global model replaces the local one."""
        for v_w, v_b in self.velocity:
            v_w.fill(0.0)
            v_b.fill(0.0)

    def __repr__(self):
        return f"SGDState(sizes={self.sizes}, max_batch={self.max_batch})"


def softmax_sgd_step_(W, b, X, y, lr, *, momentum=0.0, weight_decay=0.0, mu=0.0, W_ref=None,
                      b_ref=None, state=None):
    """One minibatch SGD step of softmax regression, in place.

    Parameters
    ----------
    W : ndarray of float32, shape (d, c), C-contiguous, writeable
        Weights, updated in place.
    b : ndarray of float32, shape (c,), writeable
        Biases, updated in place.
    X : ndarray of float32, shape (m, d), C-contiguous
        The minibatch, m >= 1 rows.
    y : ndarray of integers, shape (m,)
        Class labels in ``[0, c)``.
    lr : float
        Learning rate, finite and >= 0 (0 computes the loss and changes nothing).
    momentum : float, optional
        Classical momentum in ``[0, 1)``; > 0 needs ``state``.
    weight_decay : float, optional
        L2 penalty coefficient (>= 0) on ``W``; biases are not decayed.
    mu : float, optional
        FedProx proximal coefficient (>= 0) pulling ``(W, b)`` towards ``(W_ref, b_ref)``, which
        are required when ``mu > 0`` and ignored when ``mu == 0``.
    W_ref, b_ref : ndarray of float32, optional
        The reference (global) model, shaped like ``W`` and ``b``.
    state : SGDState, optional
        Built with ``SGDState((d, c), max_batch)``: holds the velocity and, in the compiled
        backend, the scratch memory, so repeated steps allocate nothing.

    Returns
    -------
    float
        The mean cross-entropy of the batch *before* the step (accumulated in double).

    Raises
    ------
    TypeError, ValueError
        For a bad argument, naming it; nothing is changed.
    TrainingDiverged
        When the loss of the batch is not finite (divergence, or inf/nan in ``X`` or the
        weights): the step is refused and the weights and velocity are left unchanged. It is a
        ``FloatingPointError`` and a ``ValueError``.
    """
    lr, momentum, weight_decay, mu = _check_softmax_args(
        W, b, X, y, lr, momentum, weight_decay, mu, W_ref, b_ref, state)
    ref = ((W_ref, b_ref),) if mu > 0 else None
    return _step(((W, b),), X, y, lr, momentum, weight_decay, mu, ref, state)


def mlp_sgd_step_(layers, X, y, lr, *, momentum=0.0, weight_decay=0.0, mu=0.0, ref=None,
                  state=None):
    """One minibatch SGD step of a ReLU MLP with a softmax cross-entropy head, in place.

    Parameters
    ----------
    layers : list of (W, b)
        ``W`` float32 of shape ``(d_in, d_out)``, ``b`` of shape ``(d_out,)``, consecutive
        layers chaining; ReLU between layers, none after the last. Updated in place.
    X : ndarray of float32, shape (m, d)
        The minibatch, ``d`` = rows of the first ``W``.
    y : ndarray of integers, shape (m,)
        Class labels in ``[0, c)``, ``c`` = columns of the last ``W``.
    lr, momentum, weight_decay, mu : float
        As in :func:`softmax_sgd_step_`; weight decay applies to every ``W``, not to biases.
    ref : list of (W, b), optional
        The reference (global) model for the FedProx term, shaped like ``layers``; required
        when ``mu > 0``, ignored when ``mu == 0``.
    state : SGDState, optional
        Built with ``SGDState(sizes, max_batch)`` where ``sizes = (d, d_1, ..., c)``.

    Returns
    -------
    float
        The mean cross-entropy of the batch before the step.

    Raises
    ------
    TypeError, ValueError, TrainingDiverged
        As in :func:`softmax_sgd_step_`.
    """
    lr, momentum, weight_decay, mu = _check_mlp_args(
        layers, X, y, lr, momentum, weight_decay, mu, ref, state)
    return _step(layers, X, y, lr, momentum, weight_decay, mu, ref if mu > 0 else None, state)


def mlp_sgd_epochs_(layers, X, y, lr, *, rng, epochs=1, batch_size=32, momentum=0.0,
                    weight_decay=0.0, mu=0.0, ref=None, state=None):
    """Whole epochs of minibatch SGD over ``(X, y)``, in place: a round of local training.

    Each epoch visits every sample once in the order ``rng.permutation(n)`` draws, in minibatches
    of ``batch_size`` rows (the last one may be smaller), each a :func:`mlp_sgd_step_`. The
    compiled backend runs every epoch in one call without the GIL, so a device's predictions
    never wait for training; it draws the same permutations from ``rng``.

    Parameters
    ----------
    layers, lr, momentum, weight_decay, mu, ref
        As in :func:`mlp_sgd_step_`.
    X : ndarray of float32, shape (n, d), C-contiguous
        All the samples, n >= 1.
    y : ndarray of integers, shape (n,)
        Their class labels.
    rng : numpy.random.Generator
        Draws each epoch's order.
    epochs : int
        Passes over the data, >= 1.
    batch_size : int
        Rows per step, >= 1; ``min(batch_size, n)`` is used.
    state : SGDState, optional
        Built for these layer sizes with ``max_batch >= min(batch_size, n)``; its velocity
        carries over from earlier calls. Without one, a fresh state (zero velocity) is used.

    Returns
    -------
    float
        The mean over the last epoch's minibatches of each batch's loss before its step.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, naming it; nothing is changed.
    TrainingDiverged
        When a batch's loss is not finite; the steps before it stay applied.
    """
    lr, momentum, weight_decay, mu, epochs, batch, sizes = _check_epochs_args(
        layers, X, y, lr, rng, epochs, batch_size, momentum, weight_decay, mu, ref, state)
    if state is None:
        state = SGDState(sizes, batch)
    ref = ref if mu > 0 else None
    n = X.shape[0]
    for _ in range(epochs):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            losses.append(_step(layers, X[rows], y[rows], lr, momentum, weight_decay, mu, ref,
                                state, within_epochs=True))
    return math.fsum(losses) / len(losses)


def _loss_and_gradients(layers, X, y):
    """Mean cross-entropy of an MLP on ``(X, y)`` and its gradient, in the dtype of the inputs.

    Parameters
    ----------
    layers : sequence of (W, b)
        Any float dtype (float64 for checking against finite differences).
    X : ndarray, shape (m, d)
    y : ndarray of int, shape (m,)

    Returns
    -------
    loss : float
        Mean cross-entropy, log-sum-exp shifted by the row maximum, summed in float64.
    grads : list of (gW, gb)
        Gradient of the mean loss (no decay, no proximal term), shaped like ``layers``.
    """
    activations = [X]
    for W, b in layers[:-1]:
        activations.append(np.maximum(activations[-1] @ W + b, 0))
    W, b = layers[-1]
    logits = activations[-1] @ W + b
    shift = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - shift)
    sums = e.sum(axis=1, keepdims=True, dtype=np.float64)
    m = X.shape[0]
    rows = np.arange(m)
    picked = (logits[rows, y] - shift[:, 0]).astype(np.float64)
    loss = float(np.mean(np.log(sums[:, 0]) - picked))
    delta = (e / sums).astype(logits.dtype)
    delta[rows, y] -= 1
    delta /= logits.dtype.type(m)
    grads = []
    for index in range(len(layers) - 1, -1, -1):
        W, _ = layers[index]
        inputs = activations[index]
        grads.append((inputs.T @ delta, delta.sum(axis=0)))
        if index:
            delta = (delta @ W.T) * (inputs > 0)
    return loss, grads[::-1]


def _check_softmax_args(W, b, X, y, lr, momentum, weight_decay, mu, W_ref, b_ref, state, *,
                        state_type=SGDState):
    """Validate the arguments of :func:`softmax_sgd_step_`; return the four hyperparameters.

    The compiled backend calls this (with its own ``state_type``) when its fast checks fail, so
    both backends raise the same errors.
    """
    lr, momentum, weight_decay, mu = _check_hyperparameters(lr, momentum, weight_decay, mu)
    sizes = _check_pair(W, b, ("W", "b"), writeable=True)
    if mu > 0 and (W_ref is None or b_ref is None):
        raise ValueError(
            f"mu={mu} > 0 needs the reference model the proximal term pulls towards: pass "
            "W_ref and b_ref (this round's global model)")
    if W_ref is not None or b_ref is not None:
        if W_ref is None or b_ref is None:
            raise ValueError("pass both W_ref and b_ref, or neither")
        shape = _check_pair(W_ref, b_ref, ("W_ref", "b_ref"), writeable=False)
        if shape != sizes:
            raise ValueError(f"W_ref must have the shape of W {sizes}, got {shape}")
    _check_batch(sizes, X, y, momentum, state, state_type)
    return lr, momentum, weight_decay, mu


def _check_mlp_args(layers, X, y, lr, momentum, weight_decay, mu, ref, state, *,
                    state_type=SGDState):
    """Validate the arguments of :func:`mlp_sgd_step_`; return the four hyperparameters."""
    lr, momentum, weight_decay, mu, sizes = _check_mlp_model(layers, lr, momentum, weight_decay,
                                                             mu, ref)
    _check_batch(sizes, X, y, momentum, state, state_type)
    return lr, momentum, weight_decay, mu


def _check_mlp_model(layers, lr, momentum, weight_decay, mu, ref):
    """Validate an MLP's layers, hyperparameters and FedProx reference; return the four
    hyperparameters and the layer sizes."""
    lr, momentum, weight_decay, mu = _check_hyperparameters(lr, momentum, weight_decay, mu)
    sizes = _check_layers(layers)
    if mu > 0 and ref is None:
        raise ValueError(
            f"mu={mu} > 0 needs the reference model the proximal term pulls towards: pass "
            "ref=[(W, b), ...] (this round's global model), shaped like layers")
    if ref is not None:
        _check_ref_layers(ref, layers)
    return lr, momentum, weight_decay, mu, sizes


def _check_epochs_args(layers, X, y, lr, rng, epochs, batch_size, momentum, weight_decay, mu,
                       ref, state, *, state_type=SGDState):
    """Validate the arguments of :func:`mlp_sgd_epochs_`; return the hyperparameters, the epoch
    count, the minibatch size and the layer sizes."""
    lr, momentum, weight_decay, mu, sizes = _check_mlp_model(layers, lr, momentum, weight_decay,
                                                             mu, ref)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    batch = min(batch_size, _check_samples(sizes, X, y, "n", "training"))
    if state is not None:
        _check_state(state, state_type, sizes, 1)
        if batch > state.max_batch:
            raise ValueError(
                f"minibatches of {batch} rows need an SGDState with max_batch >= {batch}, got "
                f"state.max_batch={state.max_batch}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}")
    return lr, momentum, weight_decay, mu, epochs, batch, sizes


def _positive_int(name, value):
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if not 1 <= value <= sys.maxsize:  # the compiled kernel counts in Py_ssize_t
        raise ValueError(f"{name} must be an int from 1 to {sys.maxsize}, got {value}")
    return value


def _check_hyperparameters(lr, momentum, weight_decay, mu):
    lr = _real("lr", lr)
    momentum = _real("momentum", momentum)
    weight_decay = _real("weight_decay", weight_decay)
    mu = _real("mu", mu)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu}")
    return lr, momentum, weight_decay, mu


def _check_samples(sizes, X, y, rows, user):
    """Check samples ``X`` (``rows`` of them, ``user`` needs them) and labels ``y`` against the
    layer sizes; return the row count."""
    X = _float32_array(X, "X", 2, writeable=False)
    m = X.shape[0]
    if m == 0:
        raise ValueError(f"X holds no samples (shape {X.shape}); {user} needs at least one row")
    if X.shape[1] != sizes[0]:
        raise ValueError(
            f"X has {X.shape[1]} features per row but the first weight matrix has {sizes[0]} "
            f"rows; X must have shape ({rows}, {sizes[0]})")
    _check_labels(y, m, sizes[-1])
    return m


def _check_batch(sizes, X, y, momentum, state, state_type):
    m = _check_samples(sizes, X, y, "m", "a step")
    if state is not None:
        _check_state(state, state_type, sizes, m)
    if momentum > 0 and state is None:
        raise ValueError(
            f"momentum={momentum} > 0 needs velocity buffers that persist across steps: pass "
            f"state=SGDState({sizes}, max_batch)")


def _step(layers, X, y, lr, momentum, weight_decay, mu, ref, state, *, within_epochs=False):
    """The step itself, on validated arguments; ``ref`` is None unless mu > 0.

    Like the compiled kernel, it does not warn about overflow: a non-finite loss is reported as
    one clear error, and weights that an update sends to inf are caught by the next step's loss.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        loss, grads = _loss_and_gradients(layers, X, y)
        if not math.isfinite(loss):
            raise _divergence_error(loss, lr, within_epochs=within_epochs)
        lr32, momentum32 = np.float32(lr), np.float32(momentum)
        decay32, mu32 = np.float32(weight_decay), np.float32(mu)
        for index, ((W, b), (g_w, g_b)) in enumerate(zip(layers, grads)):
            # Decided on the float32 values, as the compiled kernel does (a momentum below
            # float32's smallest number is no momentum).
            velocity = state.velocity[index] if momentum32 > 0 else (None, None)
            reference = ref[index] if ref is not None and mu32 > 0 else (None, None)
            for param, grad, decay, v, r in ((W, g_w, decay32, velocity[0], reference[0]),
                                             (b, g_b, np.float32(0), velocity[1], reference[1])):
                if decay:
                    grad += decay * param
                if r is not None:
                    grad += mu32 * (param - r)
                if v is not None:
                    v *= momentum32
                    v += grad
                    grad = v
                param -= lr32 * grad
    return loss


def _divergence_error(loss, lr, *, within_epochs=False):
    """The error for a batch whose loss is not finite (that step changed nothing)."""
    refused = ("training stopped at this batch; the steps before it stay applied"
               if within_epochs else "the step was refused and nothing changed")
    return TrainingDiverged(
        f"the batch loss is {loss}: training diverged or X or the weights hold inf/nan; "
        f"{refused}. Lower lr (now {lr}) or check the inputs")


def _real(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def _float32_array(a, name, ndim, *, writeable):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(
            f"{name} must have dtype float32, got {a.dtype}; convert it once with "
            f"np.ascontiguousarray(..., dtype=np.float32) and keep using the converted array")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray(...) of it")
    if not a.flags.aligned:
        raise ValueError(f"{name} is not aligned to its float32 items; pass a copy of it")
    if writeable and not a.flags.writeable:
        raise ValueError(
            f"{name} is read-only, but the step updates it in place; pass a writeable array")
    return a


def _check_pair(W, b, names, *, writeable):
    W = _float32_array(W, names[0], 2, writeable=writeable)
    b = _float32_array(b, names[1], 1, writeable=writeable)
    if 0 in W.shape:
        raise ValueError(
            f"{names[0]} has an empty dimension (shape {W.shape}); layers need >= 1 unit")
    if b.shape[0] != W.shape[1]:
        raise ValueError(
            f"{names[1]} must have shape ({W.shape[1]},) to match {names[0]} of shape "
            f"{W.shape}, got {b.shape}")
    return W.shape


def _pairs(layers, name):
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"{name} must be a non-empty list of (W, b) pairs, got {layers!r:.80}")
    for index, pair in enumerate(layers):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"{name}[{index}] must be a (W, b) pair, got {pair!r:.80}")
    return layers


def _check_layers(layers):
    sizes = []
    for index, (W, b) in enumerate(_pairs(layers, "layers")):
        n_in, n_out = _check_pair(
            W, b, (f"layers[{index}][0] (W)", f"layers[{index}][1] (b)"), writeable=True)
        if not sizes:
            sizes.append(n_in)
        elif n_in != sizes[-1]:
            raise ValueError(
                f"layers[{index}][0] (W) has {n_in} rows but the previous layer outputs "
                f"{sizes[-1]}; consecutive layers must chain")
        sizes.append(n_out)
    return tuple(sizes)


def _check_ref_layers(ref, layers):
    _pairs(ref, "ref")
    if len(ref) != len(layers):
        raise ValueError(f"ref must hold {len(layers)} (W, b) pairs like layers, got {len(ref)}")
    for index, ((W_ref, b_ref), (W, _)) in enumerate(zip(ref, layers)):
        shape = _check_pair(W_ref, b_ref, (f"ref[{index}][0] (W)", f"ref[{index}][1] (b)"),
                            writeable=False)
        if shape != W.shape:
            raise ValueError(
                f"ref[{index}][0] (W) must have the shape of layers[{index}][0] {W.shape}, "
                f"got {shape}")


def _check_labels(y, m, classes):
    if not isinstance(y, np.ndarray):
        raise TypeError(
            f"y must be a numpy.ndarray of integer class labels, got {type(y).__name__}")
    if y.dtype.kind not in "iu":
        raise TypeError(
            f"y must hold integer class labels, got dtype {y.dtype}; convert with "
            "y.astype(np.int64)")
    if y.shape != (m,):
        raise ValueError(f"y must have shape ({m},) to match X, got {y.shape}")
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"y[{i}] = {y[i]} is not a class label in [0, {classes}); labels index the "
            "columns of the last weight matrix")
    return y


def _check_architecture(sizes, max_batch):
    try:
        sizes = tuple(operator.index(s) for s in sizes)
    except TypeError:
        raise TypeError(
            f"sizes must be a sequence of ints (layer widths), got {sizes!r:.80}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(
            f"sizes must list at least two layer widths >= 1 (input, ..., classes), got {sizes}")
    try:
        max_batch = operator.index(max_batch)
    except TypeError:
        raise TypeError(f"max_batch must be an int, got {max_batch!r}") from None
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return sizes, max_batch


def _check_state(state, state_type, sizes, m):
    if not isinstance(state, state_type):
        raise TypeError(f"state must be an SGDState, got {type(state).__name__}")
    if state.sizes != sizes:
        raise ValueError(
            f"state was built for layer sizes {state.sizes}, but the model has sizes {sizes}; "
            "build one SGDState per architecture")
    if m > state.max_batch:
        raise ValueError(
            f"X holds {m} samples, more than state.max_batch={state.max_batch}; split the batch "
            "or build the state with a larger max_batch")
