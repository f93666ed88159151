"""The arguments of the SGD steps and epochs: model, samples, hyperparameters, state; divergence.

Shared by the compiled module and its NumPy twin, so both reject the same arguments with the
same words.
"""
from __future__ import annotations

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


def check_softmax_args(W, b, X, y, lr, momentum, weight_decay, mu, W_ref, b_ref, state, *,
                        state_type):
    """Validate the arguments of :func:`softmax_sgd_step_`; return the four hyperparameters.

    The compiled backend calls this (with its own ``state_type``) when its fast checks fail, so
    both backends raise the same errors.
    """
    lr, momentum, weight_decay, mu = check_hyperparameters(lr, momentum, weight_decay, mu)
    sizes = check_pair(W, b, ("W", "b"), writeable=True)
    if mu > 0 and (W_ref is None or b_ref is None):
        raise ValueError(
            f"mu={mu} > 0 needs the reference model the proximal term pulls towards: pass "
            "W_ref and b_ref (this round's global model)")
    if W_ref is not None or b_ref is not None:
        if W_ref is None or b_ref is None:
            raise ValueError("pass both W_ref and b_ref, or neither")
        shape = check_pair(W_ref, b_ref, ("W_ref", "b_ref"), writeable=False)
        if shape != sizes:
            raise ValueError(f"W_ref must have the shape of W {sizes}, got {shape}")
    check_batch(sizes, X, y, momentum, state, state_type)
    return lr, momentum, weight_decay, mu


def check_mlp_args(layers, X, y, lr, momentum, weight_decay, mu, ref, state, *,
                    state_type):
    """Validate the arguments of :func:`mlp_sgd_step_`; return the four hyperparameters."""
    lr, momentum, weight_decay, mu, sizes = check_mlp_model(layers, lr, momentum, weight_decay,
                                                             mu, ref)
    check_batch(sizes, X, y, momentum, state, state_type)
    return lr, momentum, weight_decay, mu


def check_mlp_model(layers, lr, momentum, weight_decay, mu, ref):
    """Validate an MLP's layers, hyperparameters and FedProx reference; return the four
    hyperparameters and the layer sizes."""
    lr, momentum, weight_decay, mu = check_hyperparameters(lr, momentum, weight_decay, mu)
    sizes = check_layers(layers)
    if mu > 0 and ref is None:
        raise ValueError(
            f"mu={mu} > 0 needs the reference model the proximal term pulls towards: pass "
            "ref=[(W, b), ...] (this round's global model), shaped like layers")
    if ref is not None:
        check_ref_layers(ref, layers)
    return lr, momentum, weight_decay, mu, sizes


def check_epochs_args(layers, X, y, lr, rng, epochs, batch_size, momentum, weight_decay, mu,
                       ref, state, *, state_type):
    """Validate the arguments of :func:`mlp_sgd_epochs_`; return the hyperparameters, the epoch
    count, the minibatch size and the layer sizes."""
    lr, momentum, weight_decay, mu, sizes = check_mlp_model(layers, lr, momentum, weight_decay,
                                                             mu, ref)
    epochs = positive_int("epochs", epochs)
    batch_size = positive_int("batch_size", batch_size)
    batch = min(batch_size, check_samples(sizes, X, y, "n", "training"))
    if state is not None:
        check_state(state, state_type, sizes, 1)
        if batch > state.max_batch:
            raise ValueError(
                f"minibatches of {batch} rows need an SGDState with max_batch >= {batch}, got "
                f"state.max_batch={state.max_batch}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}")
    return lr, momentum, weight_decay, mu, epochs, batch, sizes


def positive_int(name, value):
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if not 1 <= value <= sys.maxsize:  # the compiled kernel counts in Py_ssize_t
        raise ValueError(f"{name} must be an int from 1 to {sys.maxsize}, got {value}")
    return value


def check_hyperparameters(lr, momentum, weight_decay, mu):
    lr = real("lr", lr)
    momentum = real("momentum", momentum)
    weight_decay = real("weight_decay", weight_decay)
    mu = real("mu", mu)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu}")
    return lr, momentum, weight_decay, mu


def check_samples(sizes, X, y, rows, user):
    """Check samples ``X`` (``rows`` of them, ``user`` needs them) and labels ``y`` against the
    layer sizes; return the row count."""
    X = float32_array(X, "X", 2, writeable=False)
    m = X.shape[0]
    if m == 0:
        raise ValueError(f"X holds no samples (shape {X.shape}); {user} needs at least one row")
    if X.shape[1] != sizes[0]:
        raise ValueError(
            f"X has {X.shape[1]} features per row but the first weight matrix has {sizes[0]} "
            f"rows; X must have shape ({rows}, {sizes[0]})")
    check_labels(y, m, sizes[-1])
    return m


def check_batch(sizes, X, y, momentum, state, state_type):
    m = check_samples(sizes, X, y, "m", "a step")
    if state is not None:
        check_state(state, state_type, sizes, m)
    if momentum > 0 and state is None:
        raise ValueError(
            f"momentum={momentum} > 0 needs velocity buffers that persist across steps: pass "
            f"state=SGDState({sizes}, max_batch)")


def divergence_error(loss, lr, *, within_epochs=False):
    """The error for a batch whose loss is not finite (that step changed nothing)."""
    refused = ("training stopped at this batch; the steps before it stay applied"
               if within_epochs else "the step was refused and nothing changed")
    return TrainingDiverged(
        f"the batch loss is {loss}: training diverged or X or the weights hold inf/nan; "
        f"{refused}. Lower lr (now {lr}) or check the inputs")


def real(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def float32_array(a, name, ndim, *, writeable):
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


def check_pair(W, b, names, *, writeable):
    W = float32_array(W, names[0], 2, writeable=writeable)
    b = float32_array(b, names[1], 1, writeable=writeable)
    if 0 in W.shape:
        raise ValueError(
            f"{names[0]} has an empty dimension (shape {W.shape}); layers need >= 1 unit")
    if b.shape[0] != W.shape[1]:
        raise ValueError(
            f"{names[1]} must have shape ({W.shape[1]},) to match {names[0]} of shape "
            f"{W.shape}, got {b.shape}")
    return W.shape


def pairs(layers, name):
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"{name} must be a non-empty list of (W, b) pairs, got {layers!r:.80}")
    for index, pair in enumerate(layers):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"{name}[{index}] must be a (W, b) pair, got {pair!r:.80}")
    return layers


def check_layers(layers):
    sizes = []
    for index, (W, b) in enumerate(pairs(layers, "layers")):
        n_in, n_out = check_pair(
            W, b, (f"layers[{index}][0] (W)", f"layers[{index}][1] (b)"), writeable=True)
        if not sizes:
            sizes.append(n_in)
        elif n_in != sizes[-1]:
            raise ValueError(
                f"layers[{index}][0] (W) has {n_in} rows but the previous layer outputs "
                f"{sizes[-1]}; consecutive layers must chain")
        sizes.append(n_out)
    return tuple(sizes)


def check_ref_layers(ref, layers):
    pairs(ref, "ref")
    if len(ref) != len(layers):
        raise ValueError(f"ref must hold {len(layers)} (W, b) pairs like layers, got {len(ref)}")
    for index, ((W_ref, b_ref), (W, _)) in enumerate(zip(ref, layers)):
        shape = check_pair(W_ref, b_ref, (f"ref[{index}][0] (W)", f"ref[{index}][1] (b)"),
                            writeable=False)
        if shape != W.shape:
            raise ValueError(
                f"ref[{index}][0] (W) must have the shape of layers[{index}][0] {W.shape}, "
                f"got {shape}")


def check_labels(y, m, classes):
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


def check_architecture(sizes, max_batch):
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


def check_state(state, state_type, sizes, m):
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
