"""The shared evaluation task: scikit-learn's digits, split non-IID over devices.

The digits ship inside the scikit-learn package (nothing is downloaded); scikit-learn is a
simulation dependency (``edgefl[sim]``), not a device one, and is imported only inside
:func:`load_digits` so that a missing install gets a clear message. A simulated device receives
its part as an ``.npz`` file (:func:`digits_partition_files`) read by ``edgefl client --data``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefl.wire.model import mlp_logits


def load_digits(seed: int = 0, test_size: float = 0.25):
    """The 8x8 digits as ``(X_train, y_train, X_test, y_test)``, stratified by label.

    Parameters
    ----------
    seed : int
        Seed of the train/test shuffle.
    test_size : float
        Fraction of the 1797 samples held out, in (0, 1).

    Returns
    -------
    tuple of numpy.ndarray
        ``X`` float32 of shape ``(m, 64)`` scaled to [0, 1] (pixel / 16); ``y`` int32 in 0..9.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    try:
        # deferred for start-up time, and so that a missing scikit-learn gets the message below
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError("edgefl.simulation.datasets.load_digits needs scikit-learn, which ships the digits: "
                          "pip install 'edgefl[sim]' (or scikit-learn)") from None
    data = sklearn_digits()
    X = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = stratified_holdout(y, test_size, rng)
    train_idx = rng.permutation(np.flatnonzero(~test))
    test_idx = np.flatnonzero(test)
    return (np.ascontiguousarray(X[train_idx]), y[train_idx],
            np.ascontiguousarray(X[test_idx]), y[test_idx])


def stratified_holdout(y, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of ``fraction`` of the samples of every label (rounded), drawn by ``rng``.

    Stratified: every label is in both splits in the same proportion.
    """
    y = np.asarray(y)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: int(round(fraction * len(members)))]] = True
    return test


def dirichlet_partition(y, num_parts: int, alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Split sample indices over ``num_parts`` devices with label skew Dirichlet(``alpha``).

    For every label, the share each device gets is drawn from a symmetric Dirichlet(alpha)
    (small alpha: each device sees few labels). A device left empty by the draw takes one sample
    from the largest part, so every part is non-empty.

    Parameters
    ----------
    y : array_like of int
        Labels, one per sample.
    num_parts : int
        Number of devices, 1 <= num_parts <= len(y).
    alpha : float
        Concentration, > 0.
    seed : int
        Seed of the draw.

    Returns
    -------
    list of numpy.ndarray
        ``num_parts`` sorted int64 index arrays, disjoint, covering every sample.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D labels, got shape {y.shape}")
    if not isinstance(num_parts, (int, np.integer)) or not 1 <= num_parts <= len(y):
        raise ValueError(f"num_parts must be an integer from 1 to the {len(y)} samples, "
                         f"got {num_parts!r}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(num_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.append(chunk)
    out = [np.concatenate(p) for p in parts]
    for i in range(num_parts):
        if out[i].size == 0:
            donor = max(range(num_parts), key=lambda j: out[j].size)
            out[i], out[donor] = out[donor][-1:], out[donor][:-1]
    return [np.sort(p) for p in out]


def digits_partition_files(directory, num_parts: int, *, alpha: float = 0.5,
                           seed: int = 0) -> list[Path]:
    """Write each device's part of the digits training split to ``directory`` as ``.npz``.

    Part ``i`` is ``dirichlet_partition(y_train, num_parts, alpha, seed)[i]`` of
    ``load_digits(seed)``'s training split, saved with arrays ``X`` and ``y`` (what
    ``edgefl client --data`` reads).

    Returns
    -------
    list of pathlib.Path
        The ``num_parts`` files, ``digits-<i>-of-<num_parts>.npz``, in part order.
    """
    X_train, y_train, _, _ = load_digits(seed)
    parts = dirichlet_partition(y_train, num_parts, alpha=alpha, seed=seed)
    return save_parts(directory, "digits", X_train, y_train, parts)


def save_parts(directory, name: str, X, y, parts) -> list[Path]:
    """Write ``X[part], y[part]`` of each part to ``directory/<name>-<i>-of-<n>.npz``.

    Returns
    -------
    list of pathlib.Path
        One file per part, in part order, with arrays ``X`` and ``y``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        path = directory / f"{name}-{i}-of-{len(parts)}.npz"
        np.savez(path, X=X[part], y=y[part])
        paths.append(path)
    return paths


def digits_evaluator(seed: int):
    """Held-out accuracy on the digits evaluation task (the test split of ``load_digits``).

    Returns
    -------
    callable
        ``evaluate(model) -> {"accuracy": float}``, the evaluator an aggregation server takes.
    """
    _, _, X_test, y_test = load_digits(seed)

    def evaluate(model):
        predicted = mlp_logits(model.manifest, model.weights, X_test).argmax(axis=1)
        return {"accuracy": float((predicted == y_test).mean())}

    return evaluate


def load_synthetic(seed: int = 0, num_train: int = 60_000, num_test: int = 10_000):
    """A generated 10-class task with the digits' shape (64 features), for fleets of thousands.

    scikit-learn's ``make_classification``: 10 classes of 2 Gaussian clusters each, on 24
    informative dimensions, 8 linear combinations of them and 32 noise dimensions, class
    separation 1.6, 1 % of labels flipped; features standardised with the training split's mean
    and standard deviation. A centralised 64-32-10 MLP reaches about 88 % on the test split, so
    the task is neither trivial nor hopeless. Split over devices non-IID with
    :func:`dirichlet_partition`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(X_train, y_train, X_test, y_test)``: float32 ``(m, 64)`` and int32 labels in 0..9.
    """
    try:
        # deferred, and so that a missing scikit-learn gets the message below
        from sklearn.datasets import make_classification
    except ImportError:
        raise ImportError("edgefl.simulation.datasets.load_synthetic needs scikit-learn: "
                          "pip install 'edgefl[sim]'") from None
    X, y = make_classification(
        n_samples=num_train + num_test, n_features=64, n_informative=24, n_redundant=8,
        n_classes=10, n_clusters_per_class=2, class_sep=1.6, flip_y=0.01, random_state=seed)
    mean, std = X[:num_train].mean(axis=0), X[:num_train].std(axis=0)
    X = ((X - mean) / std).astype(np.float32)
    y = y.astype(np.int32)
    return (np.ascontiguousarray(X[:num_train]), y[:num_train],
            np.ascontiguousarray(X[num_train:]), y[num_train:])
