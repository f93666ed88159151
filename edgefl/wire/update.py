"""The binary update format: what a device sends after a round (the model envelope is
:mod:`edgefl.wire.envelope`).

Specified byte by byte in ``docs/wire-format.md``. Little-endian throughout, no pickle, no JSON
floats. Every message ends in an 8-byte checksum, the first 8 bytes of SHA-256 over everything
before it (an integrity check against corruption, not an authentication). Decoding checks every
length against the header, the message's actual size and a maximum size *before* allocating
anything, and raises :class:`UpdateDecodeError` (a ``ValueError``) saying what is wrong; for any
bytes-like payload no other exception escapes the decoder.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from edgefl.wire.coordinates import (
    F16_OVERFLOW, VALUE_ENCODINGS, check_codes, decode_coordinates, encode_coordinates,
)
from edgefl.wire.framing import CHECKSUM_BYTES, FORMAT_VERSION, checksum
from edgefl.wire.protocol import ProtocolError, check_name

UPDATE_MAGIC = b"EFLU"

#: Largest update a decoder accepts unless told otherwise (4M dense float32 parameters).
DEFAULT_MAX_UPDATE_BYTES = 16 << 20

_UPDATE_HEADER = struct.Struct("<4sBBBBIIQIIIfII")

class UpdateDecodeError(ValueError):
    """A payload that is not a valid update; the message says what is wrong."""


@dataclass(frozen=True)
class Update:
    """One device's update for one round, as carried on the wire.

    ``indices`` are sorted, distinct uint32 coordinates below ``num_params``, or None for a dense
    update (then ``values`` has ``num_params`` entries); ``values`` are float32 and exactly
    representable in ``value_encoding`` (as :class:`~edgefl.device.compression.Compressor` makes them),
    otherwise encoding rounds them. ``update_id`` (uint64) makes resends idempotent.
    """

    client_id: str
    round_id: int
    base_version: int
    update_id: int
    num_samples: int
    num_params: int
    indices: np.ndarray | None
    values: np.ndarray
    value_encoding: str = "f32"

    @property
    def k(self) -> int:
        """Number of coordinates carried."""
        return len(self.values)

    def dense(self) -> np.ndarray:
        """The update as a dense float32 vector of length ``num_params``."""
        if self.indices is None:
            return np.array(self.values, dtype=np.float32)
        out = np.zeros(self.num_params, np.float32)
        out[self.indices] = self.values
        return out


def _check_update(update: Update) -> tuple[np.ndarray | None, np.ndarray]:
    """Validate an Update for encoding; return contiguous (indices, values)."""
    try:
        check_name("client id", update.client_id)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    for name, bits in (("round_id", 32), ("base_version", 32), ("update_id", 64),
                       ("num_samples", 32), ("num_params", 32)):
        value = getattr(update, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value < 2**bits:
            raise ValueError(f"update {name} must be an integer in [0, 2**{bits}), got {value!r}")
    if update.num_params < 1:
        raise ValueError("update num_params must be at least 1")
    if update.value_encoding not in VALUE_ENCODINGS:
        raise ValueError(f"unknown value encoding {update.value_encoding!r}: use one of "
                         f"{VALUE_ENCODINGS}")
    values = np.ascontiguousarray(update.values, dtype=np.float32)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("update values must be a 1-D array of finite float32")
    if update.value_encoding == "f16" and values.size and np.abs(values).max() >= F16_OVERFLOW:
        raise ValueError(f"a value of magnitude {np.abs(values).max():g} does not fit f16 "
                         f"(largest 65504): send f32 or int8, or clip the update")
    if update.indices is None:
        if values.size != update.num_params:
            raise ValueError(f"a dense update carries {update.num_params} values, got "
                             f"{values.size}")
        return None, values
    indices = np.asarray(update.indices)
    if indices.ndim != 1 or indices.size != values.size:
        raise ValueError(f"indices ({indices.shape}) and values ({values.shape}) must be 1-D of "
                         "the same length")
    if indices.size and (indices.dtype.kind not in "iu" or indices.min() < 0
                         or indices.max() >= update.num_params
                         or np.any(np.diff(indices.astype(np.int64)) <= 0)):
        raise ValueError(f"indices must be sorted, distinct integers in [0, {update.num_params})")
    return np.ascontiguousarray(indices, dtype=np.uint32), values


def encode_update(update: Update) -> bytes:
    """Serialize ``update`` (``docs/wire-format.md``), choosing the smallest index coding.

    Raises
    ------
    ValueError
        If the update is invalid (ids out of range, unsorted indices, NaN/Inf values, ...).
    """
    indices, values = _check_update(update)
    coded = encode_coordinates(indices, values, update.value_encoding, update.num_params)
    cid = update.client_id.encode("ascii")
    header = _UPDATE_HEADER.pack(
        UPDATE_MAGIC, FORMAT_VERSION, coded.value_code, coded.index_code, len(cid),
        update.round_id, update.base_version, update.update_id, update.num_samples,
        update.num_params, values.size, coded.scale, len(coded.indices), len(coded.values))
    body = b"".join((header, cid, coded.indices, coded.values))
    return body + checksum(body)


def decode_update(payload, *, expected_params: int | None = None,
                  max_bytes: int = DEFAULT_MAX_UPDATE_BYTES) -> Update:
    """Parse and validate an update.

    Parameters
    ----------
    payload : bytes-like
        The message.
    expected_params : int, optional
        The parameter count of the model the receiver runs; a different ``num_params`` is
        rejected (shape mismatch).
    max_bytes : int
        Largest message accepted, checked before anything else.

    Raises
    ------
    UpdateDecodeError
        Naming the problem: size, truncation, bad magic, unknown version or encoding, checksum
        mismatch, inconsistent lengths, indices out of range / unsorted / duplicate, NaN or Inf,
        shape mismatch.
    """
    data = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    size = len(data)
    if size > max_bytes:
        raise UpdateDecodeError(f"update of {size} bytes exceeds the limit of {max_bytes}")
    minimum = _UPDATE_HEADER.size + CHECKSUM_BYTES
    if size < minimum:
        raise UpdateDecodeError(f"update truncated: {size} bytes, a header and checksum alone "
                                f"take {minimum}")
    (magic, version, enc, coding, cid_len, round_id, base_version, update_id, num_samples,
     num_params, k, scale, index_len, value_len) = _UPDATE_HEADER.unpack_from(data)
    if magic != UPDATE_MAGIC:
        raise UpdateDecodeError(f"bad magic {bytes(magic)!r}: not an edgefl update "
                                f"(expected {UPDATE_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise UpdateDecodeError(f"update format version {version} is not supported (this edgefl "
                                f"reads version {FORMAT_VERSION}); upgrade the older side")
    body_len = size - CHECKSUM_BYTES
    if bytes(data[body_len:]) != checksum(data[:body_len]):
        raise UpdateDecodeError("checksum mismatch: the update was corrupted or truncated")
    if num_params < 1:
        raise UpdateDecodeError("num_params is 0")
    if expected_params is not None and num_params != expected_params:
        raise UpdateDecodeError(f"shape mismatch: the update has {num_params} parameters, the "
                                f"model has {expected_params}")
    try:
        encoding, coding = check_codes(enc, coding, num_params, k, value_len)
    except ValueError as exc:
        raise UpdateDecodeError(str(exc)) from None
    if _UPDATE_HEADER.size + cid_len + index_len + value_len != body_len:
        raise UpdateDecodeError(
            f"lengths do not add up: header {_UPDATE_HEADER.size} + client id {cid_len} + indices "
            f"{index_len} + values {value_len} != {body_len} bytes before the checksum")
    if not math.isfinite(scale) or scale < 0:
        raise UpdateDecodeError(f"value scale {scale} is not a finite number >= 0")
    pos = _UPDATE_HEADER.size
    try:
        client_id = check_name("client id", bytes(data[pos:pos + cid_len]).decode("ascii"))
    except (UnicodeDecodeError, ProtocolError):
        raise UpdateDecodeError("client id is not 1-64 characters of A-Z a-z 0-9 _ . -") from None
    pos += cid_len
    try:
        indices, values = decode_coordinates(coding, encoding, num_params, k, scale,
                                             bytes(data[pos:pos + index_len]),
                                             bytes(data[pos + index_len:body_len]))
    except ValueError as exc:
        raise UpdateDecodeError(str(exc)) from None
    return Update(client_id, round_id, base_version, update_id, num_samples, num_params,
                  indices, values, "ternary" if encoding == "signs" else encoding)
