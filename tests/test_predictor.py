"""The live predictor: real onnxruntime sessions, atomic swaps under concurrent load."""
import dataclasses
import hashlib
import threading
import time

import numpy as np
import pytest

from edgefl.wire.model import mlp_logits
from edgefl.device.predictor import Predictor, ModelRejected
from edgefl.wire.protocol import TrainingConfig
from edgefl.device.trainer import LocalTrainer
from edgefl.simulation.datasets import load_digits
from edgefl_server.model_builder import build_mlp, dense_extractor

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.backend, pytest.mark.cpu]


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def model():
    return build_mlp((64, 32, 10), seed=1)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).random((16, 64), dtype=np.float32)


def test_predict_returns_the_models_class_probabilities(model, X):
    p = Predictor(model)
    probs = p.predict(X)
    assert probs.shape == (16, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, softmax(mlp_logits(model.manifest, model.weights, X)),
                               rtol=1e-5, atol=1e-6)
    one = p.predict(X[3])
    assert one.shape == (10,)
    np.testing.assert_allclose(one, probs[3], rtol=1e-5, atol=1e-7)
    assert p.predict_with_version(X[0])[1] == 0


def test_bad_input_shape_is_a_clear_error(model):
    p = Predictor(model)
    with pytest.raises(ValueError, match=r"\(64,\)"):
        p.predict(np.zeros(63, np.float32))
    with pytest.raises(ValueError, match="shape"):
        p.predict(np.zeros((2, 2, 64), np.float32))


def test_swap_installs_new_weights(model, X):
    p = Predictor(model)
    new = model.with_weights(model.weights * -1.5, version=1, round_id=1)
    assert p.swap(new) is True
    assert p.version == 1
    np.testing.assert_allclose(p.predict(X), softmax(mlp_logits(new.manifest, new.weights, X)),
                               rtol=1e-5, atol=1e-6)
    assert p.swap(new) is False  # the retained model arriving again is a no-op


def test_swap_keeps_a_private_copy_of_the_weights(model, X):
    p = Predictor(model)
    weights = model.weights * 2
    p.swap(model.with_weights(weights, version=1, round_id=1))
    before = p.predict(X)
    weights[:] = 0.0
    np.testing.assert_array_equal(p.predict(X), before)


def test_swap_to_a_different_graph(model, X):
    p = Predictor(model)
    other = dataclasses.replace(build_mlp((64, 16, 8, 10), seed=2), version=5)
    p.swap(other)
    assert p.version == 5
    np.testing.assert_allclose(p.predict(X), softmax(mlp_logits(other.manifest, other.weights, X)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda m: dataclasses.replace(m, version=2, onnx=m.onnx + b"\0"), "SHA-256"),
    (lambda m: dataclasses.replace(m, version=0), "older"),
    (lambda m: m.with_weights(m.weights + 1, version=1, round_id=1), "already active"),
    (lambda m: dataclasses.replace(
        m, version=2, onnx=b"not onnx", onnx_sha256=hashlib.sha256(b"not onnx").digest()),
     "cannot load"),
    (lambda m: dataclasses.replace(
        build_mlp((64, 10)), version=2, manifest=build_mlp((64, 9, 10)).manifest,
        weights=build_mlp((64, 9, 10)).weights), "do not match its manifest"),
])
def test_swap_refuses_bad_models_and_keeps_serving(model, X, make, message):
    p = Predictor(model)
    current = model.with_weights(model.weights, version=1, round_id=1)
    p.swap(current)
    expected = p.predict(X)
    with pytest.raises(ModelRejected, match=message):
        p.swap(make(current))
    assert p.version == 1
    np.testing.assert_array_equal(p.predict(X), expected)
    assert issubclass(ModelRejected, ValueError)


def test_the_first_model_is_checked_too(model):
    with pytest.raises(ModelRejected, match="SHA-256"):
        Predictor(dataclasses.replace(model, onnx=model.onnx + b"\0"))


def test_swap_storm_under_concurrent_predictions(model, X):
    """Every prediction equals exactly the output of the version it reports.

    Most swaps bring new weights; every fifth brings a different graph (a new session).
    """
    versions = 40
    rng = np.random.default_rng(1)
    other_graph = build_mlp((64, 16, 10), seed=9)
    models = [model]
    for v in range(1, versions + 1):
        base = other_graph if v % 5 == 0 else model
        noise = rng.normal(0, 0.3, base.weights.size).astype(np.float32)
        models.append(base.with_weights(base.weights + noise, version=v, round_id=v))
    expected = {m.version: softmax(mlp_logits(m.manifest, m.weights, X[:4])) for m in models}
    p = Predictor(model)
    stop = threading.Event()
    errors, seen = [], []

    def client():
        last = -1
        try:
            while not stop.is_set():
                out, version = p.predict_with_version(X[:4])
                np.testing.assert_allclose(out, expected[version], rtol=1e-4, atol=1e-6)
                assert version >= last, "a thread went back to an older model"
                last = version
                seen.append(version)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for m in models[1:]:
        p.swap(m)
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not errors, errors[:3]
    assert len(set(seen)) > versions // 4, "predictions did not interleave with the swaps"
    assert p.version == versions
    assert p.stats().count >= len(seen)


def test_predictions_continue_while_training_runs(model, X):
    """Predictions complete inside training calls (the kernels release the GIL). Counted, not
    timed: training calls repeat until 20 predictions have started and finished inside one, so
    a loaded machine that schedules the predicting thread late only makes the test longer."""
    X_train, y_train, _, _ = load_digits()
    p = Predictor(model)
    trainer = LocalTrainer(model.manifest)
    trainer.add(X_train, y_train)
    config = TrainingConfig(epochs=8, lr=0.05, batch_size=16)
    calls = [0]  # training calls started; a prediction counts if no call began or ended meanwhile
    training = threading.Event()
    stop = threading.Event()
    inside = []

    def train():
        deadline = time.monotonic() + 120
        while len(inside) < 20 and time.monotonic() < deadline:
            calls[0] += 1
            training.set()
            trainer.train(model.weights, config)
            training.clear()
        stop.set()

    worker = threading.Thread(target=train)
    worker.start()
    while not stop.is_set():
        call = calls[0]
        if not training.is_set():
            training.wait(0.01)
            continue
        out = p.predict(X[0])
        if training.is_set() and calls[0] == call:
            inside.append(out)
    worker.join()
    assert len(inside) >= 20, f"only {len(inside)} predictions finished while training ran"
    assert all(np.isfinite(o).all() for o in inside)


def test_stats_report_latency_percentiles_and_version(model, X):
    p = Predictor(model)
    assert np.isnan(p.stats().p50_us)
    for _ in range(50):
        p.predict(X[0])
    s = p.stats()
    assert s.count == 50 and s.version == 0
    assert 0 < s.p50_us <= s.p99_us


def test_intra_op_threads_is_validated(model):
    with pytest.raises(ValueError, match="intra_op_threads"):
        Predictor(model, intra_op_threads=0)


def test_graph_optimization_is_validated(model):
    with pytest.raises(ValueError, match=r"graph_optimization must be one of \['all', 'basic'"):
        Predictor(model, graph_optimization="ORT_ENABLE_ALL")


@pytest.mark.parametrize("with_extractor", [False, True], ids=["head", "extractor+head"])
def test_every_graph_optimization_level_predicts_the_same(with_extractor, X):
    rng = np.random.default_rng(3)
    extractor = (dense_extractor(rng.standard_normal((64, 24)).astype(np.float32) / 8,
                                 rng.standard_normal(24).astype(np.float32))
                 if with_extractor else None)
    head = (24, 16, 10) if with_extractor else (64, 32, 10)
    m = build_mlp(head, seed=4, extractor=extractor)
    outputs = {level: Predictor(m, graph_optimization=level).predict(X)
               for level in ("disabled", "basic", "extended", "all")}
    for level, probs in outputs.items():
        np.testing.assert_allclose(probs, outputs["disabled"], rtol=1e-5, atol=1e-6,
                                   err_msg=level)


def test_features_of_a_plain_head_are_the_samples(model, X):
    features = Predictor(model).features(X[:3].astype(np.float64))
    assert features.dtype == np.float32 and features.flags.c_contiguous
    np.testing.assert_array_equal(features, X[:3])
