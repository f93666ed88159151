"""The fused SGD steps: the compiled steps against the NumPy twin, the twin's gradient against
finite differences, each update term on its own, argument errors, and training that works."""
import contextlib
import pickle
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from backends import COMPILED, both_backends
from edgefl._kernels.fallback import sgd as twin

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.kernels, pytest.mark.cpu]


#: The compiled backend has two matrix products (AVX2 and the 4-float baseline an ARM board
#: runs); the agreement tests run both on any machine.
PRODUCTS = ["native", "baseline"]


@contextlib.contextmanager
def matrix_product(kind):
    if kind == "native":
        yield
        return
    from edgefl._kernels import sgd as compiled
    previous = compiled._use_baseline_product(True)
    try:
        yield
    finally:
        compiled._use_baseline_product(previous)


def make_model(sizes, rng):
    return [((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32),
             (rng.standard_normal(n_out) * 0.1).astype(np.float32))
            for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def copy_model(layers, dtype=np.float32):
    return [(W.astype(dtype), b.astype(dtype)) for W, b in layers]


def make_batch(sizes, m, rng):
    X = rng.standard_normal((m, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], m)
    return X, y


def grads64(layers, X, y):
    """Loss and gradient in float64 by the twin's math (checked against finite differences)."""
    return twin._loss_and_gradients(copy_model(layers, np.float64), X.astype(np.float64), y)


# --- agreement with the twin ------------------------------------------------------------------

@pytest.mark.parametrize("product", PRODUCTS)
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 24), min_size=2, max_size=4).map(
           lambda s: s[:-1] + [max(2, s[-1])]),
       m=st.integers(1, 20),
       lr=st.sampled_from([0.0, 0.01, 0.1]),
       momentum=st.sampled_from([0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 1e-2]),
       mu=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2**16))
@example(sizes=[1, 2], m=1, lr=0.0, momentum=0.0, weight_decay=0.0, mu=0.0, seed=0)
@example(sizes=[1, 2], m=1, lr=0.1, momentum=0.9, weight_decay=1e-2, mu=0.1, seed=1)
@example(sizes=[64, 32, 10], m=32, lr=0.1, momentum=0.9, weight_decay=1e-2, mu=0.1, seed=2)
@example(sizes=[37, 41, 17, 9], m=13, lr=0.1, momentum=0.9, weight_decay=1e-2, mu=0.1, seed=3)
def test_backend_agrees_with_twin_over_many_steps(product, sizes, m, lr, momentum, weight_decay,
                                                  mu, seed):
    with matrix_product(product):
        _agree_over_many_steps(sizes, m, lr, momentum, weight_decay, mu, seed)


def _agree_over_many_steps(sizes, m, lr, momentum, weight_decay, mu, seed):
    rng = np.random.default_rng(seed)
    start = make_model(sizes, rng)
    ref = make_model(sizes, rng)
    X, y = make_batch(sizes, m, rng)
    ours, theirs = copy_model(start), copy_model(start)
    state_ours, state_theirs = COMPILED.SGDState(sizes, m), twin.SGDState(sizes, m)
    for _ in range(10):
        loss_ours = COMPILED.mlp_sgd_step_(ours, X, y, lr, momentum=momentum, weight_decay=weight_decay,
                                    mu=mu, ref=ref, state=state_ours)
        loss_theirs = twin.mlp_sgd_step_(theirs, X, y, lr, momentum=momentum,
                                         weight_decay=weight_decay, mu=mu, ref=ref,
                                         state=state_theirs)
        assert loss_ours == pytest.approx(loss_theirs, rel=1e-5, abs=1e-6)
    for (W1, b1), (W2, b2), (v1, vb1), (v2, vb2) in zip(ours, theirs, state_ours.velocity,
                                                       state_theirs.velocity):
        np.testing.assert_allclose(W1, W2, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b1, b2, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v1, v2, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(vb1, vb2, rtol=1e-4, atol=1e-4)
    if lr == 0:
        for (W, b), (W0, b0) in zip(ours, start):
            np.testing.assert_array_equal(W, W0)
            np.testing.assert_array_equal(b, b0)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 70), c=st.integers(2, 20), m=st.integers(1, 40), seed=st.integers(0, 99))
def test_softmax_step_without_state_agrees_with_twin(d, c, m, seed):
    rng = np.random.default_rng(seed)
    [(W, b)] = make_model((d, c), rng)
    X, y = make_batch((d, c), m, rng)
    W2, b2 = W.copy(), b.copy()
    loss = COMPILED.softmax_sgd_step_(W, b, X, y, 0.1)
    loss_twin = twin.softmax_sgd_step_(W2, b2, X, y, 0.1)
    assert loss == pytest.approx(loss_twin, rel=1e-5)
    np.testing.assert_allclose(W, W2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, b2, rtol=1e-5, atol=1e-6)


# --- the math ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [(5, 3), (6, 4, 3), (4, 5, 3, 2)])
def test_twin_gradient_matches_central_differences_in_float64(sizes):
    rng = np.random.default_rng(len(sizes))
    layers = copy_model(make_model(sizes, rng), np.float64)
    X = rng.standard_normal((7, sizes[0]))
    y = rng.integers(0, sizes[-1], 7)
    _, grads = twin._loss_and_gradients(layers, X, y)
    h = 1e-6
    for layer, grad in zip(layers, grads):
        for param, g in zip(layer, grad):
            numeric = np.empty_like(param)
            for index in np.ndindex(param.shape):
                saved = param[index]
                param[index] = saved + h
                up, _ = twin._loss_and_gradients(layers, X, y)
                param[index] = saved - h
                down, _ = twin._loss_and_gradients(layers, X, y)
                param[index] = saved
                numeric[index] = (up - down) / (2 * h)
            np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8)


@both_backends
def test_step_subtracts_lr_times_the_float64_gradient(K):
    rng = np.random.default_rng(3)
    sizes = (12, 8, 5)
    layers = make_model(sizes, rng)
    X, y = make_batch(sizes, 9, rng)
    loss64, grads = grads64(layers, X, y)
    before = copy_model(layers)
    lr = 0.5
    loss = K.mlp_sgd_step_(layers, X, y, lr)
    assert loss == pytest.approx(loss64, rel=1e-6)
    for (W, b), (W0, b0), (g_w, g_b) in zip(layers, before, grads):
        np.testing.assert_allclose((W0 - W) / lr, g_w, atol=2e-6)
        np.testing.assert_allclose((b0 - b) / lr, g_b, atol=2e-6)


@both_backends
def test_loss_returned_is_the_loss_before_the_step(K):
    rng = np.random.default_rng(4)
    [(W, b)] = make_model((10, 4), rng)
    X, y = make_batch((10, 4), 16, rng)
    expected, _ = grads64([(W, b)], X, y)
    first = K.softmax_sgd_step_(W, b, X, y, 1.0)
    assert first == pytest.approx(expected, rel=1e-6)
    expected_second, _ = grads64([(W, b)], X, y)
    second = K.softmax_sgd_step_(W, b, X, y, 1.0)
    assert second == pytest.approx(expected_second, rel=1e-6)
    assert second < first  # the step in between lowered it


@both_backends
def test_loss_is_stable_for_huge_logits(K):
    W = np.array([[1e4, -1e4, 0.0]], np.float32)
    b = np.zeros(3, np.float32)
    X = np.array([[1.0], [-1.0]], np.float32)
    y = np.array([0, 2])
    # Row 0: the label has the largest logit (loss ~0); row 1: it trails the maximum by 1e4.
    loss = K.softmax_sgd_step_(W, b, X, y, 0.0)
    assert loss == pytest.approx((0.0 + 1e4) / 2, rel=1e-6)


@both_backends
def test_softmax_is_accurate_across_the_float32_exponent_range(K):
    # One feature equal to 1, so the logits are W's row, spread over [-87, 0]: the gradient of the
    # logits, (softmax - onehot) / m, comes back as the change of b at lr = 1.
    rng = np.random.default_rng(20)
    logits = np.sort(rng.uniform(-87.0, 0.0, 64)).astype(np.float32)
    logits[-1] = 0.0
    W = logits[None, :].copy()
    b = np.zeros_like(logits)
    X = np.ones((1, 1), np.float32)
    y = np.array([40])
    z = logits.astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    loss = K.softmax_sgd_step_(W, b, X, y, 1.0)
    assert loss == pytest.approx(np.log(np.exp(z).sum()) - z[40], rel=1e-7)
    expected = p.copy()
    expected[40] -= 1
    np.testing.assert_allclose(-b, expected, rtol=4e-7, atol=1e-37)


@both_backends
def test_weight_decay_acts_on_weights_only(K):
    rng = np.random.default_rng(5)
    sizes = (6, 5, 3)
    start = make_model(sizes, rng)
    X, y = make_batch(sizes, 8, rng)
    plain, decayed = copy_model(start), copy_model(start)
    lr, decay = 0.1, 0.5
    K.mlp_sgd_step_(plain, X, y, lr)
    K.mlp_sgd_step_(decayed, X, y, lr, weight_decay=decay)
    for (W, b), (Wd, bd), (W0, _) in zip(plain, decayed, start):
        np.testing.assert_allclose(Wd, W - lr * decay * W0, atol=1e-6)
        np.testing.assert_array_equal(bd, b)


@both_backends
def test_momentum_accumulates_velocity(K):
    rng = np.random.default_rng(6)
    sizes = (7, 4)
    [(W, b)] = make_model(sizes, rng)
    X1, y1 = make_batch(sizes, 5, rng)
    X2, y2 = make_batch(sizes, 5, rng)
    state = K.SGDState(sizes, 5)
    lr, beta = 0.3, 0.9
    W0, b0 = W.copy(), b.copy()
    _, [(g1_w, g1_b)] = grads64([(W0, b0)], X1, y1)
    K.softmax_sgd_step_(W, b, X1, y1, lr, momentum=beta, state=state)
    np.testing.assert_allclose(state.velocity[0][0], g1_w, atol=1e-6)
    W1, b1 = W.copy(), b.copy()
    _, [(g2_w, g2_b)] = grads64([(W1, b1)], X2, y2)
    K.softmax_sgd_step_(W, b, X2, y2, lr, momentum=beta, state=state)
    np.testing.assert_allclose(state.velocity[0][0], beta * g1_w + g2_w, atol=1e-6)
    np.testing.assert_allclose(state.velocity[0][1], beta * g1_b + g2_b, atol=1e-6)
    np.testing.assert_allclose(W, W1 - lr * (beta * g1_w + g2_w), atol=1e-6)
    state.reset()
    assert not any(v.any() for pair in state.velocity for v in pair)


@both_backends
def test_fedprox_term_is_mu_times_distance_to_reference(K):
    rng = np.random.default_rng(7)
    sizes = (6, 5, 3)
    start, ref = make_model(sizes, rng), make_model(sizes, rng)
    X, y = make_batch(sizes, 8, rng)
    plain, prox = copy_model(start), copy_model(start)
    lr, mu = 0.1, 0.7
    K.mlp_sgd_step_(plain, X, y, lr)
    K.mlp_sgd_step_(prox, X, y, lr, mu=mu, ref=ref)
    for (W, b), (Wp, bp), (W0, b0), (Wr, br) in zip(plain, prox, start, ref):
        np.testing.assert_allclose(Wp, W - lr * mu * (W0 - Wr), atol=1e-6)
        np.testing.assert_allclose(bp, b - lr * mu * (b0 - br), atol=1e-6)


@both_backends
def test_large_mu_pulls_weights_to_the_reference(K):
    rng = np.random.default_rng(8)
    sizes = (10, 4)
    [(W, b)] = make_model(sizes, rng)
    [(W_ref, b_ref)] = make_model(sizes, rng)
    X, y = make_batch(sizes, 16, rng)
    distance = np.linalg.norm(W - W_ref)
    for _ in range(100):
        K.softmax_sgd_step_(W, b, X, y, 0.01, mu=50.0, W_ref=W_ref, b_ref=b_ref)
    # The fixed point is w_ref - grad / mu: within |grad| / 50 of the reference.
    assert np.linalg.norm(W - W_ref) < 0.05 * distance
    assert np.abs(b - b_ref).max() < 0.05


@both_backends
def test_mu_zero_ignores_the_reference(K):
    rng = np.random.default_rng(9)
    [(W, b)] = make_model((5, 3), rng)
    [(W_ref, b_ref)] = make_model((5, 3), rng)
    X, y = make_batch((5, 3), 4, rng)
    W2, b2 = W.copy(), b.copy()
    K.softmax_sgd_step_(W, b, X, y, 0.5, mu=0.0, W_ref=W_ref, b_ref=b_ref)
    K.softmax_sgd_step_(W2, b2, X, y, 0.5)
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(b, b2)


# --- training ----------------------------------------------------------------------------------

@both_backends
def test_softmax_separates_a_separable_problem(K):
    rng = np.random.default_rng(10)
    centres = np.array([[4, 0], [-4, 0], [0, 4]], np.float32)
    y = rng.integers(0, 3, 300)
    X = (centres[y] + rng.standard_normal((300, 2))).astype(np.float32)
    W, b = np.zeros((2, 3), np.float32), np.zeros(3, np.float32)
    state = K.SGDState((2, 3), 30)
    for _ in range(20):
        for start in range(0, 300, 30):
            K.softmax_sgd_step_(W, b, X[start:start + 30], y[start:start + 30], 0.2,
                                momentum=0.5, state=state)
    accuracy = np.mean((X @ W + b).argmax(axis=1) == y)
    assert accuracy >= 0.99


@pytest.mark.parametrize("product", PRODUCTS)
def test_mlp_learns_digits_to_95_percent_held_out(product):
    with matrix_product(product):
        accuracy = _digits_accuracy(COMPILED)
    assert accuracy >= 0.95


def _digits_accuracy(K):
    digits = load_digits()
    X = (digits.data / 16).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    rng = np.random.default_rng(11)
    layers = [((rng.standard_normal((64, 32)) * np.sqrt(2 / 64)).astype(np.float32),
               np.zeros(32, np.float32)),
              ((rng.standard_normal((32, 10)) * np.sqrt(2 / 32)).astype(np.float32),
               np.zeros(10, np.float32))]
    state = K.SGDState((64, 32, 10), 32)
    for _ in range(15):
        order = rng.permutation(len(X_train))
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            K.mlp_sgd_step_(layers, np.ascontiguousarray(X_train[batch]), y_train[batch], 0.1,
                            momentum=0.9, weight_decay=1e-4, state=state)
    (W1, b1), (W2, b2) = layers
    predictions = (np.maximum(X_test @ W1 + b1, 0) @ W2 + b2).argmax(axis=1)
    return np.mean(predictions == y_test)


# --- labels ------------------------------------------------------------------------------------

@both_backends
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int16, np.uint64])
def test_any_integer_label_dtype_is_accepted(K, dtype):
    rng = np.random.default_rng(12)
    [(W, b)] = make_model((4, 3), rng)
    X, y = make_batch((4, 3), 6, rng)
    W2, b2 = W.copy(), b.copy()
    loss = K.softmax_sgd_step_(W, b, X, y.astype(dtype), 0.1)
    assert loss == pytest.approx(K.softmax_sgd_step_(W2, b2, X, y, 0.1))
    np.testing.assert_array_equal(W, W2)


@both_backends
def test_strided_labels_and_read_only_batch_are_accepted(K):
    rng = np.random.default_rng(13)
    [(W, b)] = make_model((4, 3), rng)
    X, y = make_batch((4, 3), 6, rng)
    X.flags.writeable = False
    spread = np.repeat(y, 2)[::2]
    assert not spread.flags.c_contiguous
    W2, b2 = W.copy(), b.copy()
    K.softmax_sgd_step_(W, b, X, spread, 0.1)
    K.softmax_sgd_step_(W2, b2, X, y, 0.1)
    np.testing.assert_array_equal(W, W2)


# --- errors ------------------------------------------------------------------------------------

def _softmax_args(rng=None):
    rng = rng or np.random.default_rng(14)
    [(W, b)] = make_model((4, 3), rng)
    X, y = make_batch((4, 3), 5, rng)
    return dict(W=W, b=b, X=X, y=y, lr=0.1)


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


SOFTMAX_ERRORS = [
    # (change to valid arguments, exception, words the message must contain)
    (dict(W=[[0.0] * 3] * 4), TypeError, "W must be a numpy.ndarray"),
    (dict(W=np.zeros((4, 3))), TypeError, "W must have dtype float32, got float64"),
    (dict(W=np.zeros((4, 3), ">f4")), TypeError, "W must have dtype float32"),
    (dict(W=np.zeros(12, np.float32)), ValueError, "W must be 2-D"),
    (dict(W=np.asfortranarray(np.ones((4, 3), np.float32))), ValueError,
     "W must be C-contiguous"),
    (dict(W=_read_only(np.ones((4, 3), np.float32))), ValueError, "W is read-only"),
    (dict(W=np.zeros((4, 0), np.float32), b=np.zeros(0, np.float32)), ValueError, "empty"),
    (dict(b=np.zeros(4, np.float32)), ValueError, r"b must have shape \(3,\)"),
    (dict(b=_read_only(np.zeros(3, np.float32))), ValueError, "b is read-only"),
    (dict(X=np.zeros((5, 6), np.float32)), ValueError, "X has 6 features per row"),
    (dict(X=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64)), ValueError, "no samples"),
    (dict(X=np.zeros((5, 4))), TypeError, "X must have dtype float32"),
    (dict(X=np.zeros((4, 5), np.float32).T), ValueError, "X must be C-contiguous"),
    (dict(y=[0, 1, 2, 0, 1]), TypeError, "y must be a numpy.ndarray"),
    (dict(y=np.zeros(5)), TypeError, "y must hold integer class labels, got dtype float64"),
    (dict(y=np.zeros(5, bool)), TypeError, "y must hold integer class labels"),
    (dict(y=np.zeros(4, np.int64)), ValueError, r"y must have shape \(5,\)"),
    (dict(y=np.array([0, 1, 2, 3, 0])), ValueError,
     r"y\[3\] = 3 is not a class label in \[0, 3\)"),
    (dict(y=np.array([0, -1, 2, 1, 0])), ValueError, r"y\[1\] = -1"),
    (dict(y=np.array([0, 1, 2, 1, 2**63], np.uint64)), ValueError,
     r"y\[4\] = 9223372036854775808"),
    (dict(lr=-0.1), ValueError, "lr must be a finite number >= 0, got -0.1"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
    (dict(lr="fast"), TypeError, "lr must be a real number"),
    (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\), got 1.0"),
    (dict(momentum=0.5), ValueError, "momentum=0.5 > 0 needs velocity buffers"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(mu=-1.0), ValueError, "mu must be a finite number >= 0"),
    (dict(mu=0.1), ValueError, "mu=0.1 > 0 needs the reference model"),
    (dict(W_ref=np.zeros((4, 3), np.float32)), ValueError, "pass both W_ref and b_ref"),
    (dict(mu=0.1, W_ref=np.zeros((3, 3), np.float32), b_ref=np.zeros(3, np.float32)),
     ValueError, r"W_ref must have the shape of W \(4, 3\)"),
    (dict(W_ref=np.zeros((4, 3)), b_ref=np.zeros(3, np.float32)), TypeError,
     "W_ref must have dtype"),
    (dict(state=object()), TypeError, "state must be an SGDState"),
    (dict(state="sizes"), ValueError, r"state was built for layer sizes \(4, 5, 3\)"),
    (dict(state="batch"), ValueError, "more than state.max_batch=2"),
]


def _resolve(args, module):
    if args.get("state") == "sizes":
        args["state"] = module.SGDState((4, 5, 3), 8)
    elif args.get("state") == "batch":
        args["state"] = module.SGDState((4, 3), 2)
    return args


@pytest.mark.parametrize("change, error, words", SOFTMAX_ERRORS)
def test_softmax_step_rejects_bad_arguments_and_changes_nothing(change, error, words):
    args = _resolve({**_softmax_args(), **change}, COMPILED)
    W, b = args["W"], args["b"]
    before = [np.array(W, copy=True), np.array(b, copy=True)]
    with pytest.raises(error, match=words) as raised:
        COMPILED.softmax_sgd_step_(**args)
    np.testing.assert_array_equal(np.asarray(W), before[0])
    np.testing.assert_array_equal(np.asarray(b), before[1])
    # Both backends word every error the same way.
    with pytest.raises(error) as raised_by_twin:
        twin.softmax_sgd_step_(**_resolve({**_softmax_args(), **change}, twin))
    assert str(raised.value) == str(raised_by_twin.value)


def _mlp_args():
    rng = np.random.default_rng(15)
    layers = make_model((4, 5, 3), rng)
    X, y = make_batch((4, 5, 3), 5, rng)
    return dict(layers=layers, X=X, y=y, lr=0.1)


MLP_ERRORS = [
    (lambda a: a.update(layers=()), TypeError, "layers must be a non-empty list"),
    (lambda a: a.update(layers=np.zeros((2, 2))), TypeError, "layers must be a non-empty list"),
    (lambda a: a["layers"].__setitem__(1, (a["layers"][1][0],)), TypeError,
     r"layers\[1\] must be a \(W, b\) pair"),
    (lambda a: a["layers"].__setitem__(1, (np.zeros((4, 3), np.float32),
                                           np.zeros(3, np.float32))),
     ValueError, r"layers\[1\]\[0\] \(W\) has 4 rows but the previous layer outputs 5"),
    (lambda a: a["layers"].__setitem__(0, (a["layers"][0][0].astype(np.float64),
                                           a["layers"][0][1])),
     TypeError, r"layers\[0\]\[0\] \(W\) must have dtype float32"),
    (lambda a: a["layers"].__setitem__(1, (a["layers"][1][0], np.zeros(4, np.float32))),
     ValueError, r"layers\[1\]\[1\] \(b\) must have shape \(3,\)"),
    (lambda a: a.update(mu=0.5), ValueError, r"pass ref=\[\(W, b\), ...\]"),
    (lambda a: a.update(mu=0.5, ref=a["layers"][:1]), ValueError, "ref must hold 2"),
    (lambda a: a.update(mu=0.5, ref=[a["layers"][0], (np.zeros((5, 4), np.float32),
                                                     np.zeros(4, np.float32))]),
     ValueError, r"ref\[1\]\[0\] \(W\) must have the shape of layers\[1\]\[0\] \(5, 3\)"),
    (lambda a: a.update(y=np.array([0, 1, 2, 5, 0])), ValueError, r"y\[3\] = 5"),
    (lambda a: a.update(X=np.zeros((5, 3), np.float32)), ValueError, "X has 3 features"),
]


@pytest.mark.parametrize("change, error, words", MLP_ERRORS)
def test_mlp_step_rejects_bad_arguments_and_changes_nothing(change, error, words):
    args = _mlp_args()
    weights = [a for pair in args["layers"] for a in pair]
    before = [a.copy() for a in weights]
    change(args)
    with pytest.raises(error, match=words) as raised:
        COMPILED.mlp_sgd_step_(**args)
    for a, a0 in zip(weights, before):
        np.testing.assert_array_equal(a, a0)
    twin_args = _mlp_args()
    change(twin_args)
    with pytest.raises(error) as raised_by_twin:
        twin.mlp_sgd_step_(**twin_args)
    assert str(raised.value) == str(raised_by_twin.value)


@both_backends
@pytest.mark.parametrize("poison", ["X", "W"])
def test_non_finite_loss_refuses_the_step(K, poison):
    rng = np.random.default_rng(16)
    sizes = (4, 6, 3)
    layers = make_model(sizes, rng)
    X, y = make_batch(sizes, 5, rng)
    if poison == "X":
        X[2, 1] = np.nan
    else:
        layers[0][0][1, 2] = np.inf
    state = K.SGDState(sizes, 5)
    state.velocity[0][0][:] = 1.0
    before = copy_model(layers)
    words = r"the batch loss is nan.*nothing changed.*Lower lr"
    with pytest.raises(FloatingPointError, match=words) as raised:
        K.mlp_sgd_step_(layers, X, y, 0.1, momentum=0.9, state=state)
    for (W, b), (W0, b0) in zip(layers, before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
    assert (state.velocity[0][0] == 1.0).all()
    assert isinstance(raised.value, ValueError)


@both_backends
def test_divergence_stops_with_an_error_and_keeps_the_last_weights(K):
    rng = np.random.default_rng(17)
    [(W, b)] = make_model((8, 4), rng)
    X, y = make_batch((8, 4), 8, rng)
    X *= 100  # the first step sends the weights to inf, the second sees a nan loss
    with pytest.raises(ValueError, match="the batch loss is nan"):
        for _ in range(10):
            last = W.copy(), b.copy()
            K.softmax_sgd_step_(W, b, X, y, 1e38)
    np.testing.assert_array_equal(W, last[0])
    np.testing.assert_array_equal(b, last[1])


# --- the state ---------------------------------------------------------------------------------

@both_backends
def test_state_holds_zero_velocity_shaped_like_the_layers(K):
    state = K.SGDState([64, 32, 10], max_batch=32)
    assert state.sizes == (64, 32, 10)
    assert state.max_batch == 32
    assert [(v_w.shape, v_b.shape) for v_w, v_b in state.velocity] == [((64, 32), (32,)),
                                                                      ((32, 10), (10,))]
    assert all(v.dtype == np.float32 and not v.any() for pair in state.velocity for v in pair)
    assert repr(state) == "SGDState(sizes=(64, 32, 10), max_batch=32)"


@both_backends
@pytest.mark.parametrize("sizes, max_batch, error, words", [
    ((10,), 4, ValueError, "at least two layer widths"),
    ((10, 0), 4, ValueError, "at least two layer widths >= 1"),
    ((10, 2.5), 4, TypeError, "sizes must be a sequence of ints"),
    (10, 4, TypeError, "sizes must be a sequence of ints"),
    ((10, 3), 0, ValueError, "max_batch must be >= 1"),
    ((10, 3), 4.0, TypeError, "max_batch must be an int"),
])
def test_state_rejects_bad_architecture(K, sizes, max_batch, error, words):
    with pytest.raises(error, match=words):
        K.SGDState(sizes, max_batch)


@both_backends
def test_state_pickles_with_its_velocity(K):
    rng = np.random.default_rng(21)
    sizes = (6, 5, 3)
    layers = make_model(sizes, rng)
    X, y = make_batch(sizes, 4, rng)
    state = K.SGDState(sizes, 4)
    K.mlp_sgd_step_(layers, X, y, 0.1, momentum=0.9, state=state)
    restored = pickle.loads(pickle.dumps(state))
    assert (restored.sizes, restored.max_batch) == (sizes, 4)
    for pair, restored_pair in zip(state.velocity, restored.velocity):
        for v, w in zip(pair, restored_pair):
            assert v.any()
            np.testing.assert_array_equal(w, v)
    # The restored state steps like the original.
    resumed = copy_model(layers)
    K.mlp_sgd_step_(layers, X, y, 0.1, momentum=0.9, state=state)
    K.mlp_sgd_step_(resumed, X, y, 0.1, momentum=0.9, state=restored)
    for (W, b), (W2, b2) in zip(layers, resumed):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)


def test_one_state_serves_steps_of_any_batch_up_to_its_maximum():
    rng = np.random.default_rng(18)
    sizes = (9, 7, 4)
    start = make_model(sizes, rng)
    state = COMPILED.SGDState(sizes, 16)
    for m in (16, 3, 1, 11):
        X, y = make_batch(sizes, m, rng)
        ours, theirs = copy_model(start), copy_model(start)
        COMPILED.mlp_sgd_step_(ours, X, y, 0.2, state=state)
        twin.mlp_sgd_step_(theirs, X, y, 0.2)
        for (W, b), (W2, b2) in zip(ours, theirs):
            np.testing.assert_allclose(W, W2, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b, b2, rtol=1e-5, atol=1e-6)


@both_backends
def test_step_releases_the_gil(K):
    rng = np.random.default_rng(19)
    sizes = (1024, 1024, 10)
    layers = make_model(sizes, rng)
    X, y = make_batch(sizes, 256, rng)
    state = K.SGDState(sizes, 256)
    inside = []
    done = threading.Event()

    def train():
        # Taken while this thread holds the GIL: the main thread cannot be running Python code
        # at these instants, so a main-thread timestamp between them proves the GIL was free.
        inside.append(time.perf_counter())
        K.mlp_sgd_step_(layers, X, y, 1e-3, state=state)
        inside.append(time.perf_counter())
        done.set()

    worker = threading.Thread(target=train)
    stamps, last = [], 0.0
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        if now - last > 1e-3:
            stamps.append(now)
            last = now
    worker.join()
    enter, leave = inside
    assert any(enter < t < leave for t in stamps), f"no progress in a {leave - enter:.3f} s step"


# --- whole epochs in one call -------------------------------------------------------------------

def _epochs_by_steps(K, layers, X, y, lr, rng, epochs, batch, **hyper):
    """The epoch loop written out with ``K``'s single steps: the definition mlp_sgd_epochs_
    follows."""
    n = X.shape[0]
    batch = min(batch, n)
    state = hyper.pop("state", None) or K.SGDState(
        [layers[0][0].shape[0]] + [W.shape[1] for W, _ in layers], batch)
    for _ in range(epochs):
        order = rng.permutation(n)
        losses = [K.mlp_sgd_step_(layers, np.ascontiguousarray(X[order[s:s + batch]]),
                       y[order[s:s + batch]], lr, state=state, **hyper)
                  for s in range(0, n, batch)]
    return float(np.mean(losses))


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=2, max_size=3).map(
           lambda s: s[:-1] + [max(2, s[-1])]),
       n=st.integers(1, 70), batch=st.integers(1, 40), epochs=st.integers(1, 3),
       momentum=st.sampled_from([0.0, 0.9]), mu=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2**16))
@example(sizes=[64, 32, 10], n=100, batch=16, epochs=2, momentum=0.9, mu=0.1, seed=0)
@example(sizes=[3, 2], n=1, batch=1, epochs=1, momentum=0.0, mu=0.0, seed=1)
@example(sizes=[3, 2], n=5, batch=5, epochs=1, momentum=0.0, mu=0.0, seed=2)  # batch == n
@example(sizes=[3, 2], n=5, batch=7, epochs=2, momentum=0.0, mu=0.0, seed=3)  # batch > n
# 180 single-sample steps with momentum 0.9: at an effective step of 0.5 this diverged (loss 109),
# where float32 rounding grows without bound and no two backends can agree
@example(sizes=[12, 12, 3], n=60, batch=1, epochs=3, momentum=0.9, mu=0.0, seed=65)
def test_epochs_are_the_steps_over_numpys_permutations(sizes, n, batch, epochs, momentum, mu,
                                                       seed):
    # The same effective step, lr / (1 - momentum), with or without momentum: the comparison of
    # the backends is one of stable training, as a device trains.
    lr = 0.05 * (1.0 - momentum)
    rng = np.random.default_rng(seed)
    start, ref = make_model(sizes, rng), make_model(sizes, rng)
    X, y = make_batch(sizes, n, rng)
    hyper = dict(momentum=momentum, weight_decay=1e-3, mu=mu, ref=ref)
    ours, by_steps, theirs = copy_model(start), copy_model(start), copy_model(start)
    rngs = [np.random.default_rng(seed + 1) for _ in range(3)]
    loss = COMPILED.mlp_sgd_epochs_(ours, X, y, lr, rng=rngs[0], epochs=epochs, batch_size=batch,
                                    **hyper)
    # The same backend stepping over the same permutations gives the same bits.
    expected = _epochs_by_steps(COMPILED, by_steps, X, y, lr, rngs[1], epochs, batch, **hyper)
    assert loss == pytest.approx(expected, rel=1e-12)
    for (W, b), (W2, b2) in zip(ours, by_steps):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    # The twin agrees within float32 rounding.
    loss_twin = twin.mlp_sgd_epochs_(theirs, X, y, lr, rng=rngs[2], epochs=epochs,
                                     batch_size=batch, **hyper)
    assert loss == pytest.approx(loss_twin, rel=1e-4, abs=1e-5)
    for (W, b), (W2, b2) in zip(ours, theirs):
        np.testing.assert_allclose(W, W2, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(b, b2, rtol=1e-3, atol=1e-4)
    # All three drew exactly `epochs` permutations of n from their generator.
    follow = [r.integers(1 << 62) for r in rngs]
    assert follow[0] == follow[1] == follow[2]


@both_backends
def test_epochs_carry_the_velocity_of_a_given_state_and_leave_it_updated(K):
    rng = np.random.default_rng(30)
    sizes = (6, 5, 3)
    start = make_model(sizes, rng)
    X, y = make_batch(sizes, 20, rng)
    ours, by_steps = copy_model(start), copy_model(start)
    state, state_steps = K.SGDState(sizes, 8), K.SGDState(sizes, 8)
    for v_w, v_b in state.velocity + state_steps.velocity:
        v_w.fill(0.5)
        v_b.fill(-0.5)
    K.mlp_sgd_epochs_(ours, X, y, 0.1, rng=np.random.default_rng(1), epochs=2, batch_size=8,
                      momentum=0.9, state=state)
    _epochs_by_steps(K, by_steps, X, y, 0.1, np.random.default_rng(1), 2, 8,
                     momentum=0.9, state=state_steps)
    for (W, b), (W2, b2), (v, vb), (v2, vb2) in zip(ours, by_steps, state.velocity,
                                                    state_steps.velocity):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(v, v2)
        np.testing.assert_array_equal(vb, vb2)


@both_backends
def test_epochs_train_the_digits_mlp_to_95_percent(K):
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, digits.target, test_size=0.25,
                                                        random_state=0, stratify=digits.target)
    layers = make_model((64, 32, 10), np.random.default_rng(0))
    K.mlp_sgd_epochs_(layers, X_train, y_train, 0.1, rng=np.random.default_rng(0), epochs=30,
                      batch_size=16, momentum=0.9)
    h = X_test
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    assert (h.argmax(1) == y_test).mean() >= 0.95


def _epoch_args():
    args = _mlp_args()
    args.update(rng=np.random.default_rng(0), epochs=2, batch_size=2)
    return args


EPOCH_ERRORS = [
    *MLP_ERRORS,
    (lambda a: a.update(epochs=0), ValueError, "epochs must be an int from 1"),
    (lambda a: a.update(epochs=1.0), TypeError, "epochs must be an int"),
    (lambda a: a.update(batch_size=0), ValueError, "batch_size must be an int from 1"),
    (lambda a: a.update(batch_size=2**70), ValueError, "batch_size must be an int from 1"),
    (lambda a: a.update(rng=np.random.RandomState(0)), TypeError,
     "rng must be a numpy.random.Generator"),
    (lambda a: a.update(rng=None), TypeError, "rng must be a numpy.random.Generator"),
    (lambda a: a.update(X=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64)), ValueError,
     "X holds no samples"),
    (lambda a: a.update(y=np.zeros(4, np.int64)), ValueError, r"y must have shape \(5,\)"),
    (lambda a: a.update(lr=np.nan), ValueError, "lr must be a finite number"),
    (lambda a: a.update(state=COMPILED.SGDState((4, 5, 3), 1)), ValueError,
     "minibatches of 2 rows need an SGDState with max_batch >= 2"),
    (lambda a: a.update(state=COMPILED.SGDState((4, 3), 8)), ValueError,
     r"state was built for layer sizes \(4, 3\)"),
    (lambda a: a.update(state="state"), TypeError, "state must be an SGDState"),
]


@pytest.mark.parametrize("change, error, words", EPOCH_ERRORS)
def test_epochs_reject_bad_arguments_and_change_nothing(change, error, words):
    args = _epoch_args()
    weights = [a for pair in args["layers"] for a in pair]
    before = [a.copy() for a in weights]
    draws_before = args["rng"].bit_generator.state
    change(args)
    with pytest.raises(error, match=words) as raised:
        COMPILED.mlp_sgd_epochs_(**args)
    for a, a0 in zip(weights, before):
        np.testing.assert_array_equal(a, a0)
    if isinstance(args["rng"], np.random.Generator):
        assert args["rng"].bit_generator.state == draws_before
    twin_args = _epoch_args()
    change(twin_args)
    if isinstance(twin_args.get("state"), COMPILED.SGDState):  # the twin checks for its own class
        twin_args["state"] = twin.SGDState(twin_args["state"].sizes,
                                           twin_args["state"].max_batch)
    with pytest.raises(error) as raised_by_twin:
        twin.mlp_sgd_epochs_(**twin_args)
    assert str(raised.value) == str(raised_by_twin.value)


@pytest.mark.parametrize("module", [COMPILED, twin], ids=["backend", "twin"])
def test_epochs_stop_at_a_diverging_batch_with_a_clear_error(module):
    rng = np.random.default_rng(31)
    layers = make_model((8, 4), rng)
    X, y = make_batch((8, 4), 40, rng)
    X *= 100
    with pytest.raises(twin.TrainingDiverged, match="Lower lr"):
        module.mlp_sgd_epochs_(layers, X, y, 1e38, rng=np.random.default_rng(0), epochs=3,
                               batch_size=8)
