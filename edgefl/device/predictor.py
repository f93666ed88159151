"""Real-time predictions from the live global model, with atomic hot swaps.

The active model is one immutable snapshot (the onnxruntime session, the weights as pre-built
``OrtValue`` feeds, the version) held in a single attribute. A prediction reads that attribute
once and runs entirely on that snapshot; a swap builds the next snapshot off to the side and then
replaces the attribute in one assignment. So every prediction comes from exactly one model
version, and predictions never take a lock, never wait for a swap and never see a half-installed
model.

Why the weights are graph inputs: a new round usually changes only the weights. Feeding the
model's own read-only float32 buffers to ``InferenceSession.run`` costs no copy of the weights per
call and makes a weight swap a matter of microseconds; only a model whose ONNX bytes changed
(different SHA-256) needs a new ``InferenceSession`` (about 0.4 ms from bytes for a small head,
built before the switch, so predictions carry on meanwhile). Measured for the 64-32-10 head, one
sample: ``run`` with NumPy feeds ~10 us; ``run_with_ort_values`` ~60 us (its Python wrapper checks
every OrtValue); an IOBinding ~5 us but it is per-thread mutable state, which a server of many
threads would have to keep per thread and per model version.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from edgefl.wire.model import Model

#: How many recent prediction latencies :meth:`Predictor.stats` summarises.
LATENCY_WINDOW = 8192

#: onnxruntime's graph optimization levels by the names :class:`Predictor` takes.
GRAPH_OPTIMIZATION = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def graph_optimization_level(name: str) -> ort.GraphOptimizationLevel:
    """onnxruntime's level for one of the names in :data:`GRAPH_OPTIMIZATION`.

    Raises
    ------
    ValueError
        For any other name, listing the valid ones.
    """
    if name not in GRAPH_OPTIMIZATION:
        raise ValueError(f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION)}, "
                         f"got {name!r}")
    return GRAPH_OPTIMIZATION[name]


class ModelRejected(ValueError):
    """A model the predictor will not install: tampered bytes, an older version, a bad graph."""


@dataclass(frozen=True)
class LatencyStats:
    """Prediction latency over the last :data:`LATENCY_WINDOW` calls (all threads).

    ``count`` is every prediction since the predictor was created; percentiles are in
    microseconds, wall time of a whole :meth:`Predictor.predict` call (NaN before the first).
    """

    count: int
    p50_us: float
    p99_us: float
    version: int


class _Active(NamedTuple):
    """Everything one prediction needs, swapped as a unit."""

    model: Model
    session: ort.InferenceSession
    weight_feeds: dict  # tensor name -> read-only view of a private copy of the weights


class Predictor:
    """Serve class probabilities from a :class:`~edgefl.wire.model.Model` with onnxruntime.

    Parameters
    ----------
    model : Model
        The first model to serve; refused like any swap if its bytes do not match its SHA-256.
    intra_op_threads : int
        onnxruntime intra-op threads per prediction; 1 suits a small head on a constrained
        device (no thread pool, no spinning cores).
    graph_optimization : {"basic", "extended", "all", "disabled"}
        onnxruntime's graph optimization level for new sessions. "basic" (constant folding,
        redundant-node removal) builds a 64-32-10 head's session in half the time "all" takes,
        with the same prediction latency: its weights are graph inputs, so the higher levels'
        fusions and layout changes have nothing to work on. A frozen convolutional extractor
        may predict faster with "all", at the cost of slower swaps to a new graph.

    Notes
    -----
    Thread-safe: call :meth:`predict` from any number of threads while another thread calls
    :meth:`swap`.
    """

    def __init__(self, model: Model, *, intra_op_threads: int = 1,
                 graph_optimization: str = "basic"):
        if not isinstance(intra_op_threads, int) or intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be a positive integer, got "
                             f"{intra_op_threads!r}")
        level = graph_optimization_level(graph_optimization)
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = intra_op_threads
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options.graph_optimization_level = level
        # Spinning worker threads would burn a core of a small device between requests.
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._swap_lock = threading.Lock()
        self._latencies = np.full(LATENCY_WINDOW, np.nan)
        self._calls = itertools.count()
        self._active = self._prepare(model, current=None)

    # -- serving ---------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Version of the model that new predictions use."""
        return self._active.model.version

    @property
    def model(self) -> Model:
        """The active model."""
        return self._active.model

    def predict(self, x) -> np.ndarray:
        """Class probabilities (softmax outputs, float32) for one sample or a batch.

        Parameters
        ----------
        x : array_like
            One sample of shape ``(d,)`` or a batch ``(m, d)``, ``d`` the model's input width.

        Returns
        -------
        numpy.ndarray
            ``(num_classes,)`` for one sample, ``(m, num_classes)`` for a batch.
        """
        return self.predict_with_version(x)[0]

    def predict_with_version(self, x) -> tuple[np.ndarray, int]:
        """:meth:`predict` and the version of the one model that produced the output."""
        start = time.perf_counter()
        active = self._active  # read once: the whole call runs on this snapshot
        batch, single = self._as_batch(x, active.model.manifest.input_width)
        out = self._run(active, active.model.manifest.output_name, batch)
        self._latencies[next(self._calls) % LATENCY_WINDOW] = time.perf_counter() - start
        return (out[0] if single else out), active.model.version

    def features(self, x) -> np.ndarray:
        """The head's input for samples ``x``: the frozen extractor's output, or ``x`` itself.

        This is what :class:`~edgefl.device.trainer.LocalTrainer` trains the head on. Returns a
        C-contiguous float32 batch ``(m, head_width)``.
        """
        active = self._active
        manifest = active.model.manifest
        batch, _ = self._as_batch(x, manifest.input_width)
        if not manifest.features_name:
            return np.ascontiguousarray(batch)
        return self._run(active, manifest.features_name, batch)

    @staticmethod
    def _as_batch(x, width: int) -> tuple[np.ndarray, bool]:
        batch = np.asarray(x, dtype=np.float32)
        single = batch.ndim == 1
        if single:
            batch = batch[None, :]
        if batch.ndim != 2 or batch.shape[1] != width:
            raise ValueError(f"predict expects one sample of shape ({width},) or a batch "
                             f"(m, {width}), got shape {np.shape(x)}")
        return np.ascontiguousarray(batch), single

    @staticmethod
    def _run(active: _Active, output: str, batch: np.ndarray) -> np.ndarray:
        feeds = dict(active.weight_feeds)
        feeds[active.model.manifest.input_name] = batch
        return active.session.run([output], feeds)[0]

    def stats(self) -> LatencyStats:
        """p50/p99 latency of recent predictions, the prediction count and the active version."""
        count = self._peek_count()
        recent = self._latencies[: min(count, LATENCY_WINDOW)]
        recent = recent[~np.isnan(recent)] * 1e6
        if recent.size == 0:
            return LatencyStats(count, float("nan"), float("nan"), self.version)
        p50, p99 = np.percentile(recent, [50, 99])
        return LatencyStats(count, float(p50), float(p99), self.version)

    def _peek_count(self) -> int:
        # itertools.count has no read; its repr carries the next value without advancing it.
        return int(repr(self._calls)[6:-1])

    # -- swapping --------------------------------------------------------------------------

    def swap(self, model: Model) -> bool:
        """Install ``model`` atomically; return False if it is the active model already.

        New weights for the same graph reuse the running session; a different graph (another
        ``onnx_sha256``) gets a new session, checked and warmed up before the switch.

        Raises
        ------
        ModelRejected
            If the ONNX bytes do not hash to ``onnx_sha256``, the version is older than the
            active one, the same version arrives with different content, or the graph does not
            match its manifest. The active model keeps serving.
        """
        with self._swap_lock:  # swaps queue behind each other; predictions never take it
            current = self._active
            if model.version == current.model.version:
                if (model.onnx_sha256 == current.model.onnx_sha256
                        and model.manifest == current.model.manifest
                        and np.array_equal(model.weights, current.model.weights)):
                    return False
                raise ModelRejected(
                    f"model version {model.version} is already active with different content: "
                    "the server must publish changed models under a new version")
            self._active = self._prepare(model, current)
            return True

    def _prepare(self, model: Model, current: _Active | None) -> _Active:
        if not isinstance(model, Model):
            raise ModelRejected(f"expected an edgefl.wire.model.Model, got {type(model).__name__}")
        if current is not None and model.version < current.model.version:
            raise ModelRejected(
                f"model version {model.version} is older than the active version "
                f"{current.model.version}; a device never goes back to an older model")
        if not model.sha256_matches:
            raise ModelRejected(
                f"model version {model.version}: the ONNX bytes do not match their SHA-256 "
                f"(announced {model.onnx_sha256.hex()[:16]}...); refusing a tampered or "
                "corrupted model")
        if current is not None and current.model.onnx_sha256 == model.onnx_sha256 \
                and current.model.manifest == model.manifest:
            session = current.session
        else:
            session = self._new_session(model)
        weights = model.weights.copy()  # private, so no caller can change a live model's weights
        weights.flags.writeable = False
        manifest = model.manifest
        feeds = {spec.name: view
                 for spec, view in zip(manifest.tensors, manifest.tensor_views(weights))}
        active = _Active(model, session, feeds)
        if session is not (current.session if current else None):
            # The first run of a session allocates its buffers: pay that before going live.
            self._run(active, manifest.output_name,
                      np.zeros((1, manifest.input_width), np.float32))
        return active

    def _new_session(self, model: Model) -> ort.InferenceSession:
        manifest = model.manifest
        try:
            session = ort.InferenceSession(model.onnx, self._options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise ModelRejected(f"model version {model.version}: onnxruntime cannot load the "
                                f"graph ({exc})") from None
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        expected = {manifest.input_name} | {t.name for t in manifest.tensors}
        wanted_outputs = {manifest.output_name} | ({manifest.features_name} - {""})
        if set(inputs) != expected or not wanted_outputs <= outputs:
            raise ModelRejected(
                f"model version {model.version}: the graph's inputs {sorted(inputs)} and outputs "
                f"{sorted(outputs)} do not match its manifest (inputs {sorted(expected)}, "
                f"outputs {sorted(wanted_outputs)})")
        for spec in manifest.tensors:
            if tuple(inputs[spec.name]) != spec.shape:
                raise ModelRejected(f"model version {model.version}: graph input {spec.name} has "
                                    f"shape {inputs[spec.name]}, the manifest says {spec.shape}")
        return session
