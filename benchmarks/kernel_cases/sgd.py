"""Fused SGD steps against a straightforward NumPy forward/backward/update, in us per call.

The sizes are the device's model, not the element counts of the other kernels (``sizes`` is
ignored): softmax regression 64 -> 10 and the 64-32-10 MLP of the evaluation task, batch 32; and
one whole epoch (``mlp_sgd_epochs_``) over 1,437 samples of the digits' shape (64 features, 10
classes) against the NumPy loop a trainer would write (a permutation, a gather and a step per
minibatch).

The NumPy baseline is what one would write by hand: ``X @ W + b``, ``np.maximum`` for ReLU, a
max-shifted softmax, ``X.T @ delta`` for the weight gradients and in-place updates, with the same
momentum / weight decay / FedProx terms as the kernel when those are on. Both sides train the same
starting weights with a small learning rate, so neither diverges however often it is called. The
edgefl side holds an :class:`SGDState` as a trainer does; one row shows the cost without it, and
(compiled backend) one runs the 4-float baseline matrix product that machines without AVX2, such
as ARM boards, use.
"""
import numpy as np

from harness import Comparison

import edgefl.kernels as K

BATCH = 32
EPOCH_SAMPLES = 1437
LR = 1e-4
SOFTMAX = (64, 10)
MLP = (64, 32, 10)
TARGET = 3.0  # NumPy time / edgefl time asked for, plain steps


def numpy_sgd_step(layers, X, y, lr, momentum=0.0, weight_decay=0.0, mu=0.0, ref=None,
                   velocity=None):
    """One minibatch SGD step of a ReLU MLP (one layer = softmax regression) in plain NumPy,
    in place wherever NumPy allows it."""
    activations = [X]
    for W, b in layers[:-1]:
        h = activations[-1] @ W
        h += b
        activations.append(np.maximum(h, 0, out=h))
    W, b = layers[-1]
    p = activations[-1] @ W
    p += b
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = -np.log(p[rows, y]).mean()
    p[rows, y] -= 1
    p /= len(y)
    delta = p
    for index in range(len(layers) - 1, -1, -1):
        W, b = layers[index]
        inputs = activations[index]
        g_w, g_b = inputs.T @ delta, delta.sum(axis=0)
        if index:
            delta = delta @ W.T
            delta *= inputs > 0
        if weight_decay:
            g_w += weight_decay * W
        if mu:
            g_w += mu * (W - ref[index][0])
            g_b += mu * (b - ref[index][1])
        if momentum:
            v_w, v_b = velocity[index]
            v_w *= momentum
            v_w += g_w
            v_b *= momentum
            v_b += g_b
            g_w, g_b = v_w, v_b
        W -= lr * g_w
        b -= lr * g_b
    return loss


def _on_baseline_product(step):
    # deferred: only the compiled backend has this switch, and the benchmarks also run on the twin
    from edgefl._kernels import sgd as compiled

    previous = compiled._use_baseline_product(True)
    try:
        return step()
    finally:
        compiled._use_baseline_product(previous)


def _model(sizes, rng):
    return [(rng.standard_normal((n_in, n_out), dtype=np.float32) * np.float32(n_in ** -0.5),
             np.zeros(n_out, np.float32)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def _copy(layers):
    return [(W.copy(), b.copy()) for W, b in layers]


def comparisons(sizes):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((BATCH, SOFTMAX[0]), dtype=np.float32)
    y = rng.integers(0, SOFTMAX[-1], BATCH)
    extras = dict(momentum=0.9, weight_decay=1e-4, mu=0.01)

    for name, shape in (("softmax_sgd_step_", SOFTMAX), ("mlp_sgd_step_", MLP)):
        label = "-".join(map(str, shape))
        start = _model(shape, rng)
        ours, theirs, reference = _copy(start), _copy(start), _copy(start)
        state = K.SGDState(shape, BATCH)
        velocity = [(np.zeros_like(W), np.zeros_like(b)) for W, b in start]
        if name == "softmax_sgd_step_":
            (W, b), (W_ref, b_ref) = ours[0], reference[0]

            def plain(W=W, b=b, state=state):
                return K.softmax_sgd_step_(W, b, X, y, LR, state=state)

            def stateless(W=W, b=b):
                return K.softmax_sgd_step_(W, b, X, y, LR)

            def full(W=W, b=b, W_ref=W_ref, b_ref=b_ref, state=state):
                return K.softmax_sgd_step_(W, b, X, y, LR, W_ref=W_ref, b_ref=b_ref,
                                           state=state, **extras)
        else:
            def plain(layers=ours, state=state):
                return K.mlp_sgd_step_(layers, X, y, LR, state=state)

            def stateless(layers=ours):
                return K.mlp_sgd_step_(layers, X, y, LR)

            def full(layers=ours, ref=reference, state=state):
                return K.mlp_sgd_step_(layers, X, y, LR, ref=ref, state=state, **extras)

        yield Comparison(name, None, plain, lambda: numpy_sgd_step(theirs, X, y, LR),
                         min_ratio=TARGET, note=f"{label}, m={BATCH}, with SGDState")
        yield Comparison(f"{name} no state", None, stateless,
                         lambda: numpy_sgd_step(theirs, X, y, LR),
                         note=f"{label}, m={BATCH}, scratch allocated per call")
        if K.BACKEND == "cython" and name == "mlp_sgd_step_":
            yield Comparison(f"{name} baseline", None, lambda: _on_baseline_product(plain),
                             lambda: numpy_sgd_step(theirs, X, y, LR),
                             note=f"{label}, m={BATCH}, 4-float product (no AVX2), with SGDState")
        yield Comparison(f"{name} mom+prox", None, full,
                         lambda: numpy_sgd_step(theirs, X, y, LR, ref=reference,
                                                velocity=velocity, **extras),
                         note=f"{label}, m={BATCH}, momentum 0.9, decay 1e-4, FedProx mu 0.01")

    shape = MLP
    X_all = rng.standard_normal((EPOCH_SAMPLES, shape[0]), dtype=np.float32)
    y_all = rng.integers(0, shape[-1], EPOCH_SAMPLES)
    start = _model(shape, rng)
    ours, theirs = _copy(start), _copy(start)
    state = K.SGDState(shape, BATCH)
    ours_rng, theirs_rng = np.random.default_rng(0), np.random.default_rng(0)

    def numpy_epoch():
        order = theirs_rng.permutation(EPOCH_SAMPLES)
        for begin in range(0, EPOCH_SAMPLES, BATCH):
            rows = order[begin:begin + BATCH]
            numpy_sgd_step(theirs, X_all[rows], y_all[rows], LR)

    yield Comparison("mlp_sgd_epochs_", None,
                     lambda: K.mlp_sgd_epochs_(ours, X_all, y_all, LR, rng=ours_rng,
                                               batch_size=BATCH, state=state),
                     numpy_epoch,
                     note=f"64-32-10, one epoch of {EPOCH_SAMPLES} samples, m={BATCH}")
