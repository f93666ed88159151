"""On-device training: the sample buffer, local SGD with the kernels, FedProx, frozen extractor."""
import threading

import numpy as np
import pytest

from edgefl.simulation.datasets import load_digits
from edgefl.wire.model import mlp_logits
from edgefl.device.predictor import Predictor
from edgefl.wire.protocol import TrainingConfig
from edgefl.device.trainer import LocalTrainer
from edgefl_server.model_builder import build_mlp, dense_extractor

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.backend, pytest.mark.cpu]


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def accuracy(manifest, weights, X, y):
    return float((mlp_logits(manifest, weights, X).argmax(axis=1) == y).mean())


def test_central_training_on_digits_reaches_95_percent(digits):
    X_train, y_train, X_test, y_test = digits
    model = build_mlp((64, 32, 10), seed=0)
    trainer = LocalTrainer(model.manifest, capacity=len(y_train))
    trainer.add(X_train, y_train)
    result = trainer.train(model.weights, TrainingConfig(epochs=30, lr=0.1, momentum=0.9))
    assert result.num_samples == len(y_train)
    assert accuracy(model.manifest, model.weights + result.delta, X_test, y_test) >= 0.95


def test_delta_is_local_minus_global_and_global_is_untouched(digits):
    X_train, y_train, X_test, y_test = digits
    model = build_mlp((64, 32, 10), seed=3)
    before = model.weights.copy()
    trainer = LocalTrainer(model.manifest)
    trainer.add(X_train[:200], y_train[:200])
    result = trainer.train(model.weights, TrainingConfig(epochs=2, lr=0.1))
    np.testing.assert_array_equal(model.weights, before)
    assert result.delta.dtype == np.float32 and result.delta.shape == before.shape
    assert np.abs(result.delta).max() > 0 and np.isfinite(result.loss)
    first_loss = trainer.train(model.weights, TrainingConfig(epochs=1, lr=0.0)).loss
    assert result.loss < first_loss  # the last epoch's loss is below the untrained loss


def test_same_seed_same_delta(digits):
    X_train, y_train, _, _ = digits
    model = build_mlp((64, 10))
    results = []
    for _ in range(2):
        trainer = LocalTrainer(model.manifest, seed=7)
        trainer.add(X_train[:100], y_train[:100])
        results.append(trainer.train(model.weights, TrainingConfig(epochs=2)).delta)
    np.testing.assert_array_equal(*results)


def test_buffer_keeps_the_newest_samples(digits):
    manifest = build_mlp((64, 10)).manifest
    trainer = LocalTrainer(manifest, capacity=5)
    X = np.arange(8 * 64, dtype=np.float32).reshape(8, 64)
    y = np.arange(8) % 10
    trainer.add(X[:3], y[:3])
    assert trainer.num_samples == 3
    trainer.add(X[3:], y[3:])
    assert trainer.num_samples == 5
    kept = {int(row[0]) // 64 for row in trainer._X}
    assert kept == {3, 4, 5, 6, 7}
    trainer.add(X, y)  # a batch larger than the buffer keeps its newest rows
    assert {int(row[0]) // 64 for row in trainer._X} == {3, 4, 5, 6, 7}


@pytest.mark.parametrize("X, y, message", [
    (np.zeros((2, 63)), [0, 1], "shape"),
    (np.zeros((2, 64)), [0, 10], "labels"),
    (np.zeros((2, 64)), [0.5, 1.0], "labels"),
    (np.full((2, 64), np.nan), [0, 1], "NaN"),
])
def test_bad_samples_are_refused_and_nothing_is_added(X, y, message):
    trainer = LocalTrainer(build_mlp((64, 10)).manifest)
    with pytest.raises(ValueError, match=message):
        trainer.add(X, np.asarray(y))
    assert trainer.num_samples == 0
    with pytest.raises(ValueError, match="no local samples"):
        trainer.train(build_mlp((64, 10)).weights, TrainingConfig())


def test_fedprox_pulls_towards_the_global_model(digits):
    X_train, y_train, _, _ = digits
    model = build_mlp((64, 32, 10))
    norms = {}
    for mu in (0.0, 5.0):
        trainer = LocalTrainer(model.manifest, seed=1)
        trainer.add(X_train[:300], y_train[:300])
        delta = trainer.train(model.weights, TrainingConfig(epochs=5, lr=0.1, mu=mu)).delta
        norms[mu] = float(np.linalg.norm(delta))
    assert norms[5.0] < 0.8 * norms[0.0]


def test_divergence_is_reported():
    model = build_mlp((64, 10))
    trainer = LocalTrainer(model.manifest)
    trainer.add(np.full((8, 64), 1e30, np.float32), np.arange(8))
    with pytest.raises(FloatingPointError, match="diverged"):
        trainer.train(model.weights, TrainingConfig(epochs=3, lr=1e6))


def test_frozen_extractor_and_trained_head(digits):
    """A frozen ONNX extractor built in the test feeds the head; only the head is trained."""
    X_train, y_train, X_test, y_test = digits
    rng = np.random.default_rng(5)
    W_ex, b_ex = rng.normal(0, 0.3, (64, 48)).astype(np.float32), np.full(48, 0.1, np.float32)
    extractor = dense_extractor(W_ex, b_ex)
    model = build_mlp((48, 10), seed=0, extractor=extractor)
    assert model.manifest.input_width == 64 and model.manifest.head_width == 48
    predictor = Predictor(model)
    with pytest.raises(ValueError, match="featurizer"):
        LocalTrainer(model.manifest)
    trainer = LocalTrainer(model.manifest, featurizer=predictor.features)
    trainer.add(X_train, y_train)
    features = predictor.features(X_test)
    np.testing.assert_allclose(features, np.maximum(X_test @ W_ex + b_ex, 0), rtol=1e-5,
                               atol=1e-5)
    before = accuracy(model.manifest, model.weights, features, y_test)
    result = trainer.train(model.weights, TrainingConfig(epochs=20, lr=0.05, momentum=0.9))
    predictor.swap(model.with_weights(model.weights + result.delta, version=1, round_id=1))
    after = float((predictor.predict(X_test).argmax(axis=1) == y_test).mean())
    assert after > max(0.85, before + 0.3)
    np.testing.assert_allclose(predictor.features(X_test), features)  # the extractor is frozen


def test_features_are_computed_once_and_a_new_extractor_recomputes_them(digits):
    X_train, y_train, _, _ = digits
    rng = np.random.default_rng(6)
    first = build_mlp((16, 10), seed=0, extractor=dense_extractor(
        rng.normal(0, 0.3, (64, 16)).astype(np.float32), np.zeros(16, np.float32)))
    second = build_mlp((16, 10), seed=0, extractor=dense_extractor(
        rng.normal(0, 0.3, (64, 16)).astype(np.float32), np.zeros(16, np.float32)))
    assert first.manifest == second.manifest and first.onnx_sha256 != second.onnx_sha256
    calls = []
    predictor = Predictor(first)

    def featurizer(X):
        calls.append(len(X))
        return predictor.features(X)

    trainer = LocalTrainer(first.manifest, capacity=300, featurizer=featurizer)
    trainer.add(X_train[:200], y_train[:200])
    trainer.add(X_train[200:400], y_train[200:400])  # wraps the ring: 300 newest kept
    config = TrainingConfig(epochs=2, lr=0.05)
    trainer.train(first.weights, config)
    trainer.train(first.weights, config)
    assert calls == [200, 200]  # rounds reuse the cached features: no extractor run
    cached = trainer._X.copy()
    raw, labels = trainer.raw_samples()
    np.testing.assert_array_equal(raw, X_train[100:400])  # oldest first, as added
    np.testing.assert_array_equal(labels, y_train[100:400])

    predictor.swap(second.with_weights(second.weights, version=1, round_id=1))
    trainer.set_featurizer(predictor.features)
    order = (100 + np.arange(300)) % 300  # the ring slot of samples 100..399
    np.testing.assert_allclose(trainer._X[order], predictor.features(X_train[100:400]),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(trainer._X, cached)  # the old extractor's features are gone
    trainer.train(second.weights, config)


def test_samples_added_during_training_do_not_disturb_it(digits):
    """Training runs on a snapshot: all of the old buffer or all of the new one, never a mix."""
    X_train, y_train, _, _ = digits
    model = build_mlp((64, 10))
    config = TrainingConfig(epochs=3, lr=0.1)
    expected = []
    for rows in (slice(0, 400), slice(400, 800)):
        reference = LocalTrainer(model.manifest, capacity=400, seed=2)
        reference.add(X_train[rows], y_train[rows])
        expected.append(reference.train(model.weights, config).delta)
    trainer = LocalTrainer(model.manifest, capacity=400, seed=2)
    trainer.add(X_train[:400], y_train[:400])
    stop = threading.Event()

    def keep_adding():  # each add replaces the whole ring, as fast as it can
        while not stop.is_set():
            trainer.add(X_train[400:800], y_train[400:800])

    writer = threading.Thread(target=keep_adding)
    writer.start()
    try:
        delta = trainer.train(model.weights, config).delta
    finally:
        stop.set()
        writer.join()
    assert any(np.array_equal(delta, e) for e in expected)


def test_a_round_after_new_samples_trains_on_them(digits):
    """The snapshot kept between rounds is dropped by add(): the next round sees every sample."""
    X_train, y_train, _, _ = digits
    model = build_mlp((64, 10))
    config = TrainingConfig(epochs=2, lr=0.1)
    trainer = LocalTrainer(model.manifest, capacity=300, seed=4)
    trainer.add(X_train[:100], y_train[:100])
    assert trainer.train(model.weights, config).num_samples == 100
    trainer.add(X_train[100:300], y_train[100:300])
    result = trainer.train(model.weights, config)
    assert result.num_samples == 300
    # Same as a trainer that held all 300 samples from the start and whose generator made the
    # first round's draws (two shuffles of 100).
    fresh = LocalTrainer(model.manifest, capacity=300, seed=4)
    fresh.add(X_train[:300], y_train[:300])
    fresh._rng.permutation(100)
    fresh._rng.permutation(100)
    np.testing.assert_array_equal(result.delta, fresh.train(model.weights, config).delta)
    replaced = LocalTrainer(model.manifest, capacity=300, seed=4)
    replaced.add(X_train[:100], y_train[:100])
    replaced.train(model.weights, config)
    replaced.add(X_train[300:500], y_train[300:500])  # other samples: another delta
    assert not np.array_equal(result.delta, replaced.train(model.weights, config).delta)


def test_rounds_start_from_zero_momentum(digits):
    """Momentum does not leak from one round to the next through the reused SGD state."""
    X_train, y_train, _, _ = digits
    model = build_mlp((64, 32, 10), seed=1)
    config = TrainingConfig(epochs=1, lr=0.1, momentum=0.9)
    trainer = LocalTrainer(model.manifest, seed=5)
    trainer.add(X_train[:256], y_train[:256])
    trainer.train(model.weights, config)
    second = trainer.train(model.weights, config).delta
    # A new trainer whose generator has made the same draws gives the same second round.
    other = LocalTrainer(model.manifest, seed=5)
    other.add(X_train[:256], y_train[:256])
    other._rng.permutation(256)  # the first round's one epoch
    np.testing.assert_array_equal(second, other.train(model.weights, config).delta)


def test_concurrent_rounds_run_one_after_the_other(digits):
    """Two threads training at once get exactly what two rounds in a row would give."""
    X_train, y_train, _, _ = digits
    model = build_mlp((64, 32, 10), seed=2)
    config = TrainingConfig(epochs=3, lr=0.1, momentum=0.9)
    sequential = LocalTrainer(model.manifest, seed=6)
    sequential.add(X_train[:512], y_train[:512])
    expected = [sequential.train(model.weights, config).delta for _ in range(2)]
    trainer = LocalTrainer(model.manifest, seed=6)
    trainer.add(X_train[:512], y_train[:512])
    deltas = []
    threads = [threading.Thread(target=lambda: deltas.append(
        trainer.train(model.weights, config).delta)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(deltas) == 2
    # Either order of the two rounds, each bit for bit a sequential round.
    assert any(np.array_equal(deltas[0], a) and np.array_equal(deltas[1], b)
               for a, b in (expected, expected[::-1]))


def test_memory_stays_bounded_over_rounds_of_changing_size(digits):
    """Rounds keep one SGD state and no copy of the buffer, whatever their minibatch sizes."""
    import tracemalloc

    X_train, y_train, _, _ = digits
    model = build_mlp((64, 32, 10), seed=3)
    full_batch = TrainingConfig(epochs=1, lr=0.01, batch_size=1 << 20)  # one batch of everything
    trainer = LocalTrainer(model.manifest, capacity=len(y_train))
    tracemalloc.start()
    try:
        after = []
        for start in range(0, 1200, 150):  # each round one batch larger than the last
            trainer.add(X_train[start:start + 150], y_train[start:start + 150])
            trainer.train(model.weights, full_batch)
            after.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    # One state for 1200 rows of 64-32-10 is well under 1 MB; a state kept per size would add
    # about that much every round, and a kept copy of the buffer 350 KB.
    assert after[-1] - after[1] < 1_000_000, [a - after[1] for a in after]
