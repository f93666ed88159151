"""The model refresh: version v -> v+1 of the global model as a sparse, quantized delta.

A device that holds version ``base`` adds the refresh's values to its weights at the refresh's
indices, one IEEE binary32 addition each (round to nearest even), and obtains version
``version``; the SHA-256 of the resulting weights must equal the one the refresh carries, or the
device discards the result and takes the full model envelope instead. The ONNX graph does not
change in a refresh (its SHA-256 is carried so a device notices if it would). The server side
(error feedback, which keeps the server's model equal to the sum of the refreshes) is
:mod:`edgefl_server.downlink`. ``docs/wire-format.md`` specifies the message byte for byte.
"""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np

from edgefl.wire.coordinates import (
    VALUE_ENCODINGS, check_codes, decode_coordinates, encode_coordinates,
)
from edgefl.wire.framing import CHECKSUM_BYTES, FORMAT_VERSION, checksum

REFRESH_MAGIC = b"EFLR"
#: Largest refresh a decoder accepts unless told otherwise (as large as a dense f32 update).
DEFAULT_MAX_REFRESH_BYTES = 16 << 20

_REFRESH_HEADER = struct.Struct("<4sBBBBIIIIIfII32s32s")


class RefreshDecodeError(ValueError):
    """A payload that is not a valid model refresh; the message says what is wrong."""


class RefreshMismatch(ValueError):
    """A refresh that does not apply to the model the device holds, or does not reproduce the
    server's model: the device falls back to the full model envelope."""


def weights_sha256(weights: np.ndarray) -> bytes:
    """SHA-256 of flat weights as little-endian binary32 (the model envelope's weight bytes)."""
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").tobytes()).digest()


def apply_refresh(weights: np.ndarray, indices: np.ndarray | None,
                  values: np.ndarray) -> np.ndarray:
    """``weights`` with ``values`` added at ``indices`` (every coordinate for None), a new array.

    The one arithmetic rule of a refresh: ``w[i] = fl32(w[i] + v)``, one IEEE binary32 addition
    rounded to nearest even, the same on every machine, so a device rebuilds the server's
    weights bit for bit.
    """
    out = np.array(weights, dtype=np.float32, copy=True)
    values = np.asarray(values, dtype=np.float32)
    if indices is None:
        out += values
    else:
        out[indices] += values
    return out


@dataclass(frozen=True)
class ModelRefresh:
    """Model version ``version`` as a delta from version ``base_version``.

    ``indices`` are sorted, distinct uint32 coordinates below ``num_params`` (None: dense),
    ``values`` float32 exactly representable in ``value_encoding``; ``weights_sha256`` is the
    SHA-256 of version ``version``'s weights, ``onnx_sha256`` that of its (unchanged) graph.
    """

    base_version: int
    version: int
    round_id: int
    num_params: int
    indices: np.ndarray | None
    values: np.ndarray
    onnx_sha256: bytes
    weights_sha256: bytes
    value_encoding: str = "f32"

    @property
    def k(self) -> int:
        """Number of coordinates carried."""
        return len(self.values)

    def apply(self, weights: np.ndarray) -> np.ndarray:
        """The weights of :attr:`version` from those of :attr:`base_version`, checked.

        Raises
        ------
        RefreshMismatch
            If ``weights`` has another length, or the result's SHA-256 is not the server's.
        """
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != (self.num_params,):
            raise RefreshMismatch(f"the refresh is for {self.num_params} parameters, the model "
                                  f"has {weights.size}")
        out = apply_refresh(weights, self.indices, self.values)
        if weights_sha256(out) != self.weights_sha256:
            raise RefreshMismatch(f"the weights rebuilt for version {self.version} do not hash "
                                  f"to the server's: the model held was not version "
                                  f"{self.base_version} exactly")
        return out


def _check_fields(base_version, version, round_id, num_params, encoding, onnx_sha256) -> None:
    for name, value in (("base_version", base_version), ("version", version),
                        ("round_id", round_id), ("num_params", num_params)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value < 2**32:
            raise ValueError(f"refresh {name} must be an integer in [0, 2**32), got {value!r}")
    if version <= base_version or num_params < 1:
        raise ValueError(f"a refresh goes forward (version {version} after base "
                         f"{base_version}) over at least one parameter")
    if encoding not in VALUE_ENCODINGS:
        raise ValueError(f"unknown value encoding {encoding!r}: use one of {VALUE_ENCODINGS}")
    if len(onnx_sha256) != 32:
        raise ValueError("onnx_sha256 must be 32 bytes")


def _checked_coordinates(indices, values, num_params):
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("refresh values must be a 1-D array of finite float32")
    if indices is None:
        if values.size != num_params:
            raise ValueError(f"a dense refresh carries {num_params} values")
        return None, values
    indices = np.asarray(indices)
    if indices.shape != values.shape or (indices.size and (
            indices.min() < 0 or indices.max() >= num_params
            or np.any(np.diff(indices.astype(np.int64)) <= 0))):
        raise ValueError(f"refresh indices must be sorted, distinct and below {num_params}, one "
                         "per value")
    return np.ascontiguousarray(indices, dtype=np.uint32), values


def _assemble(coded, base_version, version, round_id, num_params, k, onnx_sha256,
              weights_hash) -> bytes:
    header = _REFRESH_HEADER.pack(
        REFRESH_MAGIC, FORMAT_VERSION, coded.value_code, coded.index_code, 0, base_version,
        version, round_id, num_params, k, coded.scale, len(coded.indices), len(coded.values),
        onnx_sha256, weights_hash)
    body = b"".join((header, coded.indices, coded.values))
    return body + checksum(body)


def encode_refresh(refresh: ModelRefresh) -> bytes:
    """Serialize ``refresh`` (``docs/wire-format.md``, Model refresh).

    Its values must be exactly representable in its value encoding (as decoded from a refresh,
    or built by :func:`build_refresh`); otherwise encoding rounds them and the weight hash no
    longer matches what a device rebuilds.
    """
    _check_fields(refresh.base_version, refresh.version, refresh.round_id, refresh.num_params,
                  refresh.value_encoding, refresh.onnx_sha256)
    if len(refresh.weights_sha256) != 32:
        raise ValueError("weights_sha256 must be 32 bytes")
    indices, values = _checked_coordinates(refresh.indices, refresh.values, refresh.num_params)
    coded = encode_coordinates(indices, values, refresh.value_encoding, refresh.num_params)
    return _assemble(coded, refresh.base_version, refresh.version, refresh.round_id,
                     refresh.num_params, values.size, refresh.onnx_sha256, refresh.weights_sha256)


def build_refresh(base_weights: np.ndarray, indices: np.ndarray | None, values: np.ndarray,
                  encoding: str, *, base_version: int, version: int, round_id: int,
                  onnx_sha256: bytes) -> tuple[bytes, ModelRefresh]:
    """The refresh message that moves ``base_weights`` by ``values`` at ``indices``, quantized
    to ``encoding``, and the refresh as a device decodes it.

    The values are quantized once; the weight hash is computed from the values *as they decode*,
    so ``refresh.apply(base_weights)`` is exactly what every device rebuilds (re-quantizing a
    quantized vector is not always the identity, e.g. int8's rounded-down scale).
    """
    _check_fields(base_version, version, round_id, base_weights.size, encoding, onnx_sha256)
    indices, values = _checked_coordinates(indices, values, base_weights.size)
    coded = encode_coordinates(indices, values, encoding, base_weights.size)
    encoding_read, coding = check_codes(coded.value_code, coded.index_code, base_weights.size,
                                        values.size, len(coded.values))
    indices, sent = decode_coordinates(coding, encoding_read, base_weights.size, values.size,
                                       coded.scale, coded.indices, coded.values)
    weights_hash = weights_sha256(apply_refresh(base_weights, indices, sent))
    payload = _assemble(coded, base_version, version, round_id, base_weights.size, values.size,
                        onnx_sha256, weights_hash)
    return payload, ModelRefresh(base_version, version, round_id, base_weights.size, indices,
                                 sent, bytes(onnx_sha256), weights_hash, encoding)


def decode_refresh(payload, *, max_bytes: int = DEFAULT_MAX_REFRESH_BYTES) -> ModelRefresh:
    """Parse and validate a model refresh.

    Raises
    ------
    RefreshDecodeError
        Naming the problem: size, truncation, bad magic, unknown version or codes, checksum
        mismatch, inconsistent lengths, a version that does not go forward, bad indices, NaN/Inf.
    """
    data = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    size = len(data)
    if size > max_bytes:
        raise RefreshDecodeError(f"refresh of {size} bytes exceeds the limit of {max_bytes}")
    minimum = _REFRESH_HEADER.size + CHECKSUM_BYTES
    if size < minimum:
        raise RefreshDecodeError(f"refresh truncated: {size} bytes, a header and checksum alone "
                                 f"take {minimum}")
    (magic, version, value_code, index_code, flags, base_version, model_version, round_id,
     num_params, k, scale, index_len, value_len, onnx_sha, weights_sha) = \
        _REFRESH_HEADER.unpack_from(data)
    if magic != REFRESH_MAGIC:
        raise RefreshDecodeError(f"bad magic {bytes(magic)!r}: not an edgefl model refresh "
                                 f"(expected {REFRESH_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise RefreshDecodeError(f"refresh format version {version} is not supported (this "
                                 f"edgefl reads version {FORMAT_VERSION}); upgrade the device")
    body_len = size - CHECKSUM_BYTES
    if bytes(data[body_len:]) != checksum(data[:body_len]):
        raise RefreshDecodeError("checksum mismatch: the refresh was corrupted or truncated")
    if flags:
        raise RefreshDecodeError(f"unknown flags {flags:#04x}")
    if num_params < 1 or model_version <= base_version:
        raise RefreshDecodeError(f"a refresh goes forward over at least one parameter: version "
                                 f"{model_version} after {base_version}, {num_params} parameters")
    try:
        encoding, coding = check_codes(value_code, index_code, num_params, k, value_len)
    except ValueError as exc:
        raise RefreshDecodeError(str(exc)) from None
    if _REFRESH_HEADER.size + index_len + value_len != body_len:
        raise RefreshDecodeError(
            f"lengths do not add up: header {_REFRESH_HEADER.size} + indices {index_len} + "
            f"values {value_len} != {body_len} bytes before the checksum")
    if not math.isfinite(scale) or scale < 0:
        raise RefreshDecodeError(f"value scale {scale} is not a finite number >= 0")
    pos = _REFRESH_HEADER.size
    try:
        indices, values = decode_coordinates(
            coding, encoding, num_params, k, scale, bytes(data[pos:pos + index_len]),
            bytes(data[pos + index_len:body_len]))
    except ValueError as exc:
        raise RefreshDecodeError(str(exc)) from None
    return ModelRefresh(base_version, model_version, round_id, num_params, indices, values,
                        bytes(onnx_sha), bytes(weights_sha),
                        "ternary" if encoding == "signs" else encoding)
