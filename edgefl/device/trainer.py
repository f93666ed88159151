"""On-device training of the model's dense head with the compiled SGD kernels.

The device keeps its own labelled samples in a fixed-size buffer and, when selected for a round,
runs a few epochs of minibatch SGD from the round's global weights. The kernels release the GIL,
so the :class:`~edgefl.device.predictor.Predictor` keeps serving on other threads while this runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgefl import kernels
from edgefl.wire.model import ModelManifest
from edgefl.wire.protocol import TrainingConfig


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced.

    ``delta`` is local minus global weights (flat float32, canonical layout), ``num_samples`` the
    number of samples trained on (the weight FedAvg gives this update), ``loss`` the mean
    cross-entropy over the minibatches of the last epoch (each measured before its step).
    """

    delta: np.ndarray
    num_samples: int
    loss: float


class LocalTrainer:
    """A bounded buffer of the device's own samples and the local SGD that trains on them.

    Parameters
    ----------
    manifest : ModelManifest
        The model whose head is trained.
    capacity : int
        Most samples kept. The buffer is allocated up front: ``capacity * (head_width + 1) * 4``
        bytes (260 KiB per 1000 samples for the 64-wide digits); it never grows, and a second
        copy exists only while an :meth:`add` overlaps a round of training.
    seed : int
        Seed of the minibatch shuffling.
    featurizer : callable, optional
        Maps raw samples ``(m, input_width)`` to the head's input ``(m, head_width)``; pass
        :meth:`Predictor.features <edgefl.device.predictor.Predictor.features>` for a model with a frozen
        extractor. Without one, samples must already be the head's input.

    Notes
    -----
    Eviction rule: the buffer is a ring. Once full, each new sample overwrites the oldest one, so
    the device trains on its most recent ``capacity`` samples (its current data distribution).

    Thread-safe: :meth:`add` may run while :meth:`train` runs on another thread; training works on
    the samples there were when it started (an add meanwhile writes to a copy of the buffer). Two
    :meth:`train` calls run one after the other.

    With a featurizer the buffer holds extractor features, computed once in :meth:`add` (so a
    round costs the head only), next to the raw samples they came from: a model whose frozen
    extractor changed computes them anew with :meth:`set_featurizer`, and :meth:`raw_samples`
    hands the samples to the trainer of a new head.
    """

    def __init__(self, manifest: ModelManifest, *, capacity: int = 4096, seed: int = 0,
                 featurizer: Callable[[np.ndarray], np.ndarray] | None = None):
        if not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if manifest.features_name and featurizer is None:
            raise ValueError("this model has a frozen feature extractor: pass "
                             "featurizer=predictor.features so samples are trained in feature space")
        self.manifest = manifest
        self.capacity = int(capacity)
        self._featurizer = featurizer
        self._X = np.zeros((self.capacity, manifest.head_width), np.float32)
        self._y = np.zeros(self.capacity, np.int32)
        # The samples the cached features came from (only with a featurizer: without one, _X
        # holds the samples themselves).
        self._raw = (np.zeros((self.capacity, manifest.input_width), np.float32)
                     if featurizer is not None else None)
        self._seen = 0  # samples ever added; the next one goes to _seen % capacity
        self._lock = threading.Lock()  # guards the buffer arrays and _round_reads_buffer
        # Copy-on-write: a round trains on views of the buffer itself, and an add() that comes
        # while it runs first moves the buffer to new arrays. So a round copies nothing (less
        # GIL held per round) and a second copy exists only while a round and an add() overlap.
        self._round_reads_buffer = False
        self._state: kernels.SGDState | None = None  # reused from round to round, see train()
        self._round_lock = threading.Lock()  # one train() at a time: they share the state
        self._rng = np.random.default_rng(seed)

    @property
    def num_samples(self) -> int:
        """Samples in the buffer now."""
        return min(self._seen, self.capacity)

    def add(self, X, y) -> None:
        """Add labelled samples (one ``(d,)`` or a batch ``(m, d)``); see the eviction rule.

        Raises
        ------
        ValueError
            On a shape mismatch, NaN/Inf features or a label outside ``0..num_classes-1``;
            nothing is added then.
        """
        X = np.asarray(X, dtype=np.float32)
        y = np.atleast_1d(np.asarray(y))
        if X.ndim == 1:
            X = X[None, :]
        raw = None
        if self._featurizer is not None:
            if X.ndim != 2 or X.shape[1] != self.manifest.input_width:
                raise ValueError(f"add expects samples of shape (m, {self.manifest.input_width}),"
                                 f" got {X.shape}")
            raw, X = X, np.asarray(self._featurizer(X), dtype=np.float32)
        width = self.manifest.head_width
        if X.ndim != 2 or X.shape[1] != width or y.shape != (X.shape[0],):
            raise ValueError(f"add expects X of shape (m, {width}) and y of shape (m,), got "
                             f"{X.shape} and {y.shape}")
        if not np.isfinite(X).all():
            raise ValueError("samples contain NaN or Inf features; clean them before adding")
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0
                       or y.max() >= self.manifest.num_classes):
            raise ValueError(f"labels must be integers in 0..{self.manifest.num_classes - 1}, "
                             f"got values from {y.min()} to {y.max()} ({y.dtype})")
        if X.shape[0] > self.capacity:  # only the newest `capacity` would survive anyway
            X, y = X[-self.capacity:], y[-self.capacity:]
            raw = raw[-self.capacity:] if raw is not None else None
        with self._lock:
            if self._round_reads_buffer:  # leave those arrays to the round, write to a copy
                self._X, self._y = self._X.copy(), self._y.copy()
                self._round_reads_buffer = False
            slots = (self._seen + np.arange(X.shape[0])) % self.capacity
            self._X[slots] = X
            self._y[slots] = y
            if raw is not None:
                self._raw[slots] = raw
            self._seen += X.shape[0]

    def raw_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stored samples (as added, not features) and labels, oldest first."""
        with self._lock:
            n = self.num_samples
            order = (self._seen + np.arange(n)) % self.capacity if n == self.capacity \
                else np.arange(n)
            source = self._raw if self._raw is not None else self._X
            return source[order].copy(), self._y[order].copy()

    def set_featurizer(self, featurizer: Callable[[np.ndarray], np.ndarray]) -> None:
        """Use a new frozen extractor: recompute the cached features of every stored sample.

        For a model whose extractor changed while its head kept its shape; a round that runs
        meanwhile finishes on the old features.
        """
        if self._featurizer is None:
            raise ValueError("this trainer's model has no feature extractor")
        with self._lock:
            n, seen = self.num_samples, self._seen
            raw, y = self._raw, self._y
        features = np.asarray(featurizer(raw[:n]), dtype=np.float32) if n else None
        if n and features.shape != (n, self.manifest.head_width):
            raise ValueError(f"the featurizer gives {features.shape}, the head takes "
                             f"(m, {self.manifest.head_width})")
        with self._lock:
            if self._seen != seen:
                raise RuntimeError("samples were added while the features were recomputed; "
                                   "add them after set_featurizer returns")
            X = np.zeros_like(self._X)
            if n:
                X[:n] = features
            # New arrays, never written in place: a running round keeps reading the old ones.
            self._X, self._y = X, y.copy()
            self._round_reads_buffer = False
            self._featurizer = featurizer

    def train(self, global_weights: np.ndarray, config: TrainingConfig) -> TrainResult:
        """Run ``config.epochs`` epochs of minibatch SGD from ``global_weights``.

        Synchronous; the SGD kernels release the GIL, so call this on a background thread and
        predictions continue. With ``config.mu > 0`` every step adds the FedProx proximal term
        ``mu * (w - w_global)``.

        Raises
        ------
        ValueError
            If the buffer is empty or the weights do not fit the manifest.
        FloatingPointError
            If training diverged (a non-finite loss or weight): lower ``lr``.
        """
        self.manifest.check_weights(global_weights)
        with self._round_lock:  # one round at a time: they share the state and the flag below
            with self._lock:
                n = self.num_samples
                X, y, buffer = self._X[:n], self._y[:n], self._X
                self._round_reads_buffer = True
            try:
                return self._train(X, y, global_weights, config)
            finally:
                with self._lock:
                    if self._X is buffer:  # no add() moved the buffer meanwhile
                        self._round_reads_buffer = False

    def _train(self, X, y, global_weights, config) -> TrainResult:
        n = len(y)
        if n == 0:
            raise ValueError("no local samples to train on: add(X, y) some first")
        local = global_weights.copy()
        layers = self.manifest.layers(local)
        reference = self.manifest.layers(global_weights.copy()) if config.mu > 0 else None
        batch = min(int(config.batch_size), n)
        # Fresh momentum each round: velocity from an older global model would push the new one
        # in a stale direction. The state (with the compiled backend's scratch memory) is kept
        # for the next round of the same minibatch size, and rebuilt for another size, so it
        # never holds more than one round needs.
        if self._state is None or self._state.max_batch != batch:
            self._state = kernels.SGDState(self.manifest.layer_sizes, batch)
        else:
            self._state.reset()
        # Every epoch in one kernel call: the compiled backend shuffles, gathers the minibatches
        # and steps without taking the GIL once, so predictions on other threads never wait for
        # training's Python glue.
        loss = kernels.mlp_sgd_epochs_(
            layers, X, y, config.lr, rng=self._rng, epochs=config.epochs, batch_size=batch,
            momentum=config.momentum, weight_decay=config.weight_decay, mu=config.mu,
            ref=reference, state=self._state)
        delta = local - global_weights
        if not np.isfinite(loss) or not np.isfinite(delta).all():
            raise FloatingPointError(f"local training diverged (loss {loss}) with lr "
                                     f"{config.lr}: lower the learning rate")
        return TrainResult(delta, n, loss)
