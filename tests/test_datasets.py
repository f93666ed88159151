"""The evaluation task: digits and the non-IID Dirichlet split."""
import numpy as np
import pytest

from edgefl.simulation.datasets import (digits_evaluator, digits_partition_files,
                                       dirichlet_partition, load_digits)
from edgefl.wire.model import mlp_logits
from edgefl_server.model_builder import build_mlp


def test_load_digits_shapes_types_and_stratification():
    X_train, y_train, X_test, y_test = load_digits(seed=0, test_size=0.25)
    assert X_train.dtype == np.float32 and y_train.dtype == np.int32
    assert X_train.shape[1] == 64 and len(X_train) + len(X_test) == 1797
    assert 0.0 <= X_train.min() and X_train.max() <= 1.0
    assert abs(len(X_test) / 1797 - 0.25) < 0.01
    train_share = np.bincount(y_train, minlength=10) / len(y_train)
    test_share = np.bincount(y_test, minlength=10) / len(y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    again = load_digits(seed=0, test_size=0.25)
    np.testing.assert_array_equal(again[0], X_train)
    assert not np.array_equal(load_digits(seed=1)[1], y_train)


def test_load_digits_validates_test_size():
    with pytest.raises(ValueError, match="test_size"):
        load_digits(test_size=1.0)


@pytest.mark.parametrize("num_parts, alpha", [(1, 0.5), (10, 0.5), (50, 0.1), (7, 100.0)])
def test_dirichlet_partition_covers_every_sample_once_and_no_part_is_empty(num_parts, alpha):
    _, y, _, _ = load_digits()
    parts = dirichlet_partition(y, num_parts, alpha=alpha, seed=3)
    assert len(parts) == num_parts
    assert all(p.size > 0 for p in parts)
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(y)))


def test_small_alpha_skews_labels_large_alpha_does_not():
    _, y, _, _ = load_digits()

    def mean_label_share_of_top_class(alpha):
        parts = dirichlet_partition(y, 10, alpha=alpha, seed=0)
        return np.mean([np.bincount(y[p], minlength=10).max() / p.size for p in parts])

    assert mean_label_share_of_top_class(0.1) > 0.5
    assert mean_label_share_of_top_class(1000.0) < 0.2


def test_dirichlet_partition_rejects_bad_arguments():
    y = np.arange(5) % 2
    with pytest.raises(ValueError, match="num_parts"):
        dirichlet_partition(y, 6)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(y, 2, alpha=0.0)
    parts = dirichlet_partition(y, 5, alpha=0.01, seed=1)
    assert sorted(p.size for p in parts) == [1, 1, 1, 1, 1]


def test_partition_files_hold_the_dirichlet_parts_of_the_training_split(tmp_path):
    paths = digits_partition_files(tmp_path, 3, alpha=0.5, seed=0)
    assert [p.name for p in paths] == [f"digits-{i}-of-3.npz" for i in range(3)]
    X_train, y_train, _, _ = load_digits(0)
    parts = dirichlet_partition(y_train, 3, alpha=0.5, seed=0)
    assert sum(len(part) for part in parts) == len(y_train) == 1347  # 75% of the 1797 digits
    for path, part in zip(paths, parts):
        with np.load(path, allow_pickle=False) as arrays:
            np.testing.assert_array_equal(arrays["X"], X_train[part])
            np.testing.assert_array_equal(arrays["y"], y_train[part])


def test_the_digits_evaluator_scores_a_model_on_the_test_split():
    model = build_mlp((64, 32, 10), seed=0)
    accuracy = digits_evaluator(0)(model)["accuracy"]
    _, _, X_test, y_test = load_digits(0)
    expected = (mlp_logits(model.manifest, model.weights, X_test).argmax(1) == y_test).mean()
    assert accuracy == pytest.approx(float(expected))
