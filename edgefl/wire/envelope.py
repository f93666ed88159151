"""The model envelope: how the server sends a global model to devices (``docs/wire-format.md``).

Version, round, SHA-256 of the ONNX bytes, the manifest of trainable tensors, the weights, the
ONNX bytes and room for a signature, then the checksum. Decoding checks every length against the
header, the message's actual size and a maximum size *before* allocating anything, and raises
:class:`ModelDecodeError` (a ``ValueError``) saying what is wrong.
"""
from __future__ import annotations

import struct

import numpy as np

from edgefl.wire.framing import CHECKSUM_BYTES, FORMAT_VERSION, checksum
from edgefl.wire.model import ManifestError, Model, ModelManifest

MODEL_MAGIC = b"EFLM"
#: Largest model envelope a decoder accepts unless told otherwise.
DEFAULT_MAX_MODEL_BYTES = 256 << 20

_MODEL_HEADER = struct.Struct("<4sBBHIIIII32s")


class ModelDecodeError(ValueError):
    """A payload that is not a valid model envelope; the message says what is wrong."""


def encode_model(model: Model) -> bytes:
    """Serialize ``model`` into the model envelope (``docs/wire-format.md``)."""
    manifest = model.manifest.to_bytes()
    if len(model.signature) > 0xFFFF:
        raise ValueError(f"signature of {len(model.signature)} bytes exceeds 65535")
    header = _MODEL_HEADER.pack(
        MODEL_MAGIC, FORMAT_VERSION, 0, len(model.signature), model.version, model.round_id,
        len(manifest), model.manifest.num_params, len(model.onnx), model.onnx_sha256)
    body = b"".join((header, manifest, model.weights.astype("<f4").tobytes(), model.onnx,
                     model.signature))
    return body + checksum(body)


def decode_model(payload, *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> Model:
    """Parse and validate a model envelope.

    The SHA-256 of the ONNX bytes is carried, not checked, here: a
    :class:`~edgefl.device.predictor.Predictor` refuses the model on swap if it does not match.

    Raises
    ------
    ModelDecodeError
        Naming the problem: size, truncation, bad magic, unknown version, checksum mismatch,
        inconsistent lengths, a malformed manifest, NaN or Inf weights.
    """
    data = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    size = len(data)
    if size > max_bytes:
        raise ModelDecodeError(f"model envelope of {size} bytes exceeds the limit of {max_bytes}")
    minimum = _MODEL_HEADER.size + CHECKSUM_BYTES
    if size < minimum:
        raise ModelDecodeError(f"model envelope truncated: {size} bytes, a header and checksum "
                               f"alone take {minimum}")
    (magic, version, flags, sig_len, model_version, round_id, manifest_len, num_params, onnx_len,
     sha) = _MODEL_HEADER.unpack_from(data)
    if magic != MODEL_MAGIC:
        raise ModelDecodeError(f"bad magic {bytes(magic)!r}: not an edgefl model envelope "
                               f"(expected {MODEL_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ModelDecodeError(f"model format version {version} is not supported (this edgefl "
                               f"reads version {FORMAT_VERSION}); upgrade the device")
    body_len = size - CHECKSUM_BYTES
    if bytes(data[body_len:]) != checksum(data[:body_len]):
        raise ModelDecodeError("checksum mismatch: the model envelope was corrupted or truncated")
    if flags:
        raise ModelDecodeError(f"unknown flags {flags:#04x}")
    if _MODEL_HEADER.size + manifest_len + 4 * num_params + onnx_len + sig_len != body_len:
        raise ModelDecodeError(
            f"lengths do not add up: header {_MODEL_HEADER.size} + manifest {manifest_len} + "
            f"weights 4*{num_params} + onnx {onnx_len} + signature {sig_len} != {body_len} bytes "
            "before the checksum")
    pos = _MODEL_HEADER.size
    try:
        manifest = ModelManifest.from_bytes(bytes(data[pos:pos + manifest_len]))
    except ManifestError as exc:
        raise ModelDecodeError(str(exc)) from None
    pos += manifest_len
    if manifest.num_params != num_params:
        raise ModelDecodeError(f"the header says {num_params} parameters, the manifest "
                               f"{manifest.num_params}")
    weights = np.frombuffer(data, dtype="<f4", count=num_params, offset=pos).astype(np.float32)
    pos += 4 * num_params
    onnx = bytes(data[pos:pos + onnx_len])
    signature = bytes(data[pos + onnx_len:body_len])
    try:
        return Model(model_version, round_id, manifest, weights, onnx, bytes(sha), signature)
    except ValueError as exc:  # NaN/Inf weights
        raise ModelDecodeError(f"model version {model_version}: {exc}") from None
