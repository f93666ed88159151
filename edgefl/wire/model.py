"""A global model: ONNX bytes plus the manifest of its trainable head, and its flat weights.

The trainable part of every edgefl model is a dense head: softmax regression or an MLP with ReLU
between layers, optionally sitting on a frozen ONNX feature extractor. The ONNX graph takes the
head's tensors as *graph inputs* (``W1, b1, W2, b2, ...``), so a device supplies the weights itself
on every run and never needs the ``onnx`` package to edit a graph: a new round's weights are just a
new flat float32 vector.

Canonical flat layout: the tensors in manifest order, each C-contiguous, ``W`` of shape
``(d_in, d_out)`` and ``b`` of shape ``(d_out,)``, concatenated into one float32 vector. Server,
device and wire format all use this one layout.
"""
from __future__ import annotations

import functools
import hashlib
import math
import struct
from dataclasses import dataclass, field

import numpy as np

#: Longest tensor or graph-value name a manifest accepts (bytes of UTF-8).
MAX_NAME_BYTES = 255
#: Most tensors a manifest lists (a head of at most 32 dense layers).
MAX_TENSORS = 64
#: Largest dimension of a trainable tensor.
MAX_DIM = 1 << 24
#: Most trainable parameters a model may have (1 GiB of float32).
MAX_PARAMS = 1 << 28

_MANIFEST_MAGIC = b"EFMF"
_MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that does not describe a dense head edgefl can run and train."""


@dataclass(frozen=True)
class TensorSpec:
    """One trainable tensor: its graph-input name and shape (``(d_in, d_out)`` or ``(d_out,)``)."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        _check_name("tensor name", self.name)
        if len(self.shape) not in (1, 2) or not all(0 < d <= MAX_DIM for d in self.shape):
            raise ManifestError(
                f"tensor {self.name!r} has shape {self.shape}: a head tensor is a matrix "
                f"(d_in, d_out) or a bias (d_out,), every dimension in 1..{MAX_DIM}"
            )

    @property
    def size(self) -> int:
        """Number of float32 values in the tensor."""
        return math.prod(self.shape)


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ManifestError(f"{kind} {name!r} must be a non-empty string of at most "
                            f"{MAX_NAME_BYTES} UTF-8 bytes")


@dataclass(frozen=True)
class ModelManifest:
    """What a device needs to know to run and train a model without parsing its ONNX graph.

    Parameters
    ----------
    input_name : str
        Name of the ONNX graph input that takes the samples, shape ``(batch, input_width)``.
    input_width : int
        Number of features of one raw sample.
    output_name : str
        Name of the graph output with the class probabilities, shape ``(batch, num_classes)``.
    num_classes : int
        Number of classes.
    tensors : tuple of TensorSpec
        The trainable tensors in canonical order ``W1, b1, W2, b2, ...``.
    features_name : str
        Name of the graph output carrying the frozen extractor's features (the head's input), or
        ``""`` when the head reads the raw input directly.
    """

    input_name: str
    input_width: int
    output_name: str
    num_classes: int
    tensors: tuple[TensorSpec, ...]
    features_name: str = ""
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "tensors", tuple(self.tensors))
        _check_name("input name", self.input_name)
        _check_name("output name", self.output_name)
        if self.features_name:
            _check_name("features name", self.features_name)
        if not 0 < self.input_width <= MAX_DIM:
            raise ManifestError(f"input width {self.input_width} must be in 1..{MAX_DIM}")
        if not 2 <= self.num_classes <= MAX_DIM:
            raise ManifestError(f"num_classes {self.num_classes} must be in 2..{MAX_DIM}")
        if not 0 < len(self.tensors) <= MAX_TENSORS or len(self.tensors) % 2:
            raise ManifestError(
                f"a head lists (W, b) pairs: got {len(self.tensors)} tensors, expected an even "
                f"number from 2 to {MAX_TENSORS}"
            )
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names) or {self.input_name, self.output_name} & set(names):
            raise ManifestError(f"tensor names must be unique and differ from the input and "
                                f"output names: {names}")
        width = None
        for W, b in zip(self.tensors[0::2], self.tensors[1::2]):
            if len(W.shape) != 2 or b.shape != (W.shape[1],):
                raise ManifestError(f"layer ({W.name}, {b.name}) has shapes {W.shape}, {b.shape}: "
                                    "expected W (d_in, d_out) and b (d_out,)")
            if width is not None and W.shape[0] != width:
                raise ManifestError(f"{W.name} takes {W.shape[0]} inputs but the previous layer "
                                    f"gives {width}")
            width = W.shape[1]
        if not self.features_name and self.tensors[0].shape[0] != self.input_width:
            raise ManifestError(f"{self.tensors[0].name} takes {self.tensors[0].shape[0]} inputs "
                                f"but samples have {self.input_width} features")
        if width != self.num_classes:
            raise ManifestError(f"the last layer gives {width} outputs for {self.num_classes} "
                                "classes")
        offsets = np.cumsum([0] + [t.size for t in self.tensors])
        if offsets[-1] > MAX_PARAMS:
            raise ManifestError(f"{offsets[-1]} parameters exceed the limit of {MAX_PARAMS}")
        object.__setattr__(self, "_offsets", tuple(int(o) for o in offsets))

    @property
    def num_params(self) -> int:
        """Length of the flat weight vector."""
        return self._offsets[-1]

    @property
    def head_width(self) -> int:
        """Number of features the head reads (the extractor's output width, or the input width)."""
        return self.tensors[0].shape[0]

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """``(d_in, hidden..., num_classes)`` of the head."""
        return (self.head_width,) + tuple(W.shape[1] for W in self.tensors[0::2])

    def check_weights(self, flat) -> np.ndarray:
        """Return ``flat`` if it is a finite float32 vector of length :attr:`num_params`.

        Raises
        ------
        ValueError
            Naming the wrong dtype, length or the first non-finite position.
        """
        if not isinstance(flat, np.ndarray) or flat.dtype != np.float32 or flat.ndim != 1:
            raise ValueError(f"weights must be a 1-D float32 array, got "
                             f"{getattr(flat, 'dtype', type(flat).__name__)} "
                             f"of shape {getattr(flat, 'shape', None)}")
        if flat.size != self.num_params:
            raise ValueError(f"weights have {flat.size} values but the manifest has "
                             f"{self.num_params} parameters")
        bad = np.flatnonzero(~np.isfinite(flat))
        if bad.size:
            raise ValueError(f"weights contain {bad.size} NaN/Inf values (first at {bad[0]})")
        return flat

    def tensor_views(self, flat: np.ndarray) -> list[np.ndarray]:
        """The tensors of ``flat`` in manifest order, as reshaped views (no copy)."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"flat weights have shape {flat.shape}, expected ({self.num_params},)")
        return [flat[a:z].reshape(t.shape)
                for t, a, z in zip(self.tensors, self._offsets, self._offsets[1:])]

    def layers(self, flat: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(W1, b1), (W2, b2), ...]`` as views into ``flat``: writing them writes ``flat``."""
        views = self.tensor_views(flat)
        return list(zip(views[0::2], views[1::2]))

    def flatten(self, layers) -> np.ndarray:
        """The canonical flat float32 vector of ``[(W, b), ...]`` (a new array)."""
        tensors = [t for layer in layers for t in layer]
        if len(tensors) != len(self.tensors):
            raise ValueError(f"got {len(tensors)} tensors, the manifest has {len(self.tensors)}")
        for spec, t in zip(self.tensors, tensors):
            if tuple(np.shape(t)) != spec.shape:
                raise ValueError(f"{spec.name} has shape {np.shape(t)}, expected {spec.shape}")
        return np.concatenate([np.asarray(t, dtype=np.float32).ravel() for t in tensors])

    # -- serialisation (the manifest block of the model envelope, docs/wire-format.md) --------

    def to_bytes(self) -> bytes:
        """Binary form, little-endian: see ``docs/wire-format.md`` (manifest block)."""
        out = [_MANIFEST_MAGIC, struct.pack("<BIIH", _MANIFEST_VERSION, self.input_width,
                                           self.num_classes, len(self.tensors))]
        for name in (self.input_name, self.output_name, self.features_name):
            out.append(_pack_name(name))
        for t in self.tensors:
            out.append(_pack_name(t.name))
            out.append(struct.pack(f"<B{len(t.shape)}I", len(t.shape), *t.shape))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ModelManifest":
        """Parse :meth:`to_bytes` output; raise :class:`ManifestError` on anything malformed.

        Equal bytes give the same (immutable) manifest: every model of one graph carries the
        same manifest block, so a device parses it once instead of on every new model (parsing
        is most of decoding a small model's envelope, and it holds the GIL).
        """
        return _parse_manifest(cls, bytes(data))

    @classmethod
    def _parse(cls, data: bytes) -> "ModelManifest":
        reader = _Reader(data)
        if reader.take(4) != _MANIFEST_MAGIC:
            raise ManifestError("manifest: bad magic (expected b'EFMF')")
        version, width, classes, count = reader.unpack("<BIIH")
        if version != _MANIFEST_VERSION:
            raise ManifestError(f"manifest: format version {version} is not supported "
                                f"(this edgefl reads {_MANIFEST_VERSION})")
        if count > MAX_TENSORS:
            raise ManifestError(f"manifest: {count} tensors exceed the limit of {MAX_TENSORS}")
        input_name, output_name, features_name = (reader.name() for _ in range(3))
        tensors = []
        for _ in range(count):
            name = reader.name()
            (ndim,) = reader.unpack("<B")
            if ndim not in (1, 2):
                raise ManifestError(f"manifest: tensor {name!r} has {ndim} dimensions")
            tensors.append(TensorSpec(name, reader.unpack(f"<{ndim}I")))
        if reader.remaining:
            raise ManifestError(f"manifest: {reader.remaining} trailing bytes")
        return cls(input_name, width, output_name, classes, tuple(tensors), features_name)


@functools.lru_cache(maxsize=16)  # a few graphs at most are live at once; errors are not cached
def _parse_manifest(cls, data: bytes) -> ModelManifest:
    return cls._parse(data)


def _pack_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    return struct.pack("<B", len(raw)) + raw


class _Reader:
    """Bounds-checked sequential reads over bytes; every failure is a ManifestError."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise ManifestError(f"manifest: truncated (needed {n} bytes at offset {self.pos}, "
                                f"{self.remaining} left)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def name(self) -> str:
        (length,) = self.unpack("<B")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"manifest: a name at offset {self.pos - length} is not "
                                "UTF-8") from None


@dataclass(frozen=True)
class Model:
    """One version of the global model, as the server publishes it and a device runs it.

    ``onnx`` is the serialized graph with the trainable tensors as graph inputs; ``weights`` the
    flat float32 values for them (canonical layout); ``onnx_sha256`` the SHA-256 of ``onnx`` as
    the server announced it (a :class:`~edgefl.device.predictor.Predictor` refuses a model whose bytes do
    not hash to it); ``signature`` is opaque room for a deployment's signature scheme.
    """

    version: int
    round_id: int
    manifest: ModelManifest
    weights: np.ndarray
    onnx: bytes
    onnx_sha256: bytes
    signature: bytes = b""

    def __post_init__(self):
        for name in ("version", "round_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not 0 <= value < 2**32:
                raise ValueError(f"model {name} must be an integer in [0, 2**32), got {value!r}")
        if len(self.onnx_sha256) != 32:
            raise ValueError(f"onnx_sha256 must be 32 bytes, got {len(self.onnx_sha256)}")
        self.manifest.check_weights(self.weights)

    @property
    def sha256_matches(self) -> bool:
        """Whether the ONNX bytes hash to :attr:`onnx_sha256`."""
        return hashlib.sha256(self.onnx).digest() == self.onnx_sha256

    def with_weights(self, weights: np.ndarray, *, version: int, round_id: int) -> "Model":
        """The same graph with new weights and a new version (the server's next global model)."""
        return Model(version, round_id, self.manifest, np.ascontiguousarray(weights, np.float32),
                     self.onnx, self.onnx_sha256)


def mlp_logits(manifest: ModelManifest, weights: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The head's logits for head inputs ``X`` of shape ``(m, head_width)``, in NumPy (float32).

    For evaluation on the server and in tests; a device predicts with onnxruntime. With a frozen
    extractor, ``X`` are its features, not raw samples.
    """
    h = np.asarray(X, dtype=np.float32)
    layers = manifest.layers(weights)
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            np.maximum(h, 0.0, out=h)
    return h
