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

import numpy as np
from edgefl._kernels.checks.sgd import (TrainingDiverged, check_architecture,  # noqa: F401 - public
                                        check_epochs_args, check_mlp_args, check_softmax_args,
                                        divergence_error)
from edgefl._kernels.docs import document


class SGDState:

    def __init__(self, sizes, max_batch):
        self.sizes, self.max_batch = check_architecture(sizes, max_batch)
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
    lr, momentum, weight_decay, mu = check_softmax_args(
        W, b, X, y, lr, momentum, weight_decay, mu, W_ref, b_ref, state, state_type=SGDState)
    ref = ((W_ref, b_ref),) if mu > 0 else None
    return _step(((W, b),), X, y, lr, momentum, weight_decay, mu, ref, state)


def mlp_sgd_step_(layers, X, y, lr, *, momentum=0.0, weight_decay=0.0, mu=0.0, ref=None,
                  state=None):
    lr, momentum, weight_decay, mu = check_mlp_args(
        layers, X, y, lr, momentum, weight_decay, mu, ref, state, state_type=SGDState)
    return _step(layers, X, y, lr, momentum, weight_decay, mu, ref if mu > 0 else None, state)


def mlp_sgd_epochs_(layers, X, y, lr, *, rng, epochs=1, batch_size=32, momentum=0.0,
                    weight_decay=0.0, mu=0.0, ref=None, state=None):
    lr, momentum, weight_decay, mu, epochs, batch, sizes = check_epochs_args(
        layers, X, y, lr, rng, epochs, batch_size, momentum, weight_decay, mu, ref, state, state_type=SGDState)
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


def _step(layers, X, y, lr, momentum, weight_decay, mu, ref, state, *, within_epochs=False):
    """The step itself, on validated arguments; ``ref`` is None unless mu > 0.

    Like the compiled kernel, it does not warn about overflow: a non-finite loss is reported as
    one clear error, and weights that an update sends to inf are caught by the next step's loss.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        loss, grads = _loss_and_gradients(layers, X, y)
        if not math.isfinite(loss):
            raise divergence_error(loss, lr, within_epochs=within_epochs)
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


document(softmax_sgd_step_, mlp_sgd_step_, mlp_sgd_epochs_, SGDState)
