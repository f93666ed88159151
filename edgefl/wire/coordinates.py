"""The coordinate coding shared by updates and model refreshes: sparse indices and their values.

A sparse vector travels as ``k`` sorted, distinct indices below ``n`` (coded ``varint``, ``rice``
or ``bitmap``, whichever is shortest; no indices at all for ``dense``) followed by ``k`` values
(``f32``, ``f16``, ``int8``, ``ternary`` or ``signs``). ``docs/wire-format.md`` gives the codings
byte for byte; :mod:`~edgefl.wire.update` and :mod:`~edgefl.wire.refresh` put them in their
messages.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgefl import kernels

VALUE_ENCODINGS = ("f32", "f16", "int8", "ternary")
#: Value codes on the wire: the four encodings, then "signs", the packing of a ternary vector
#: with no zero value (one sign bit per value instead of two bits), chosen by the encoder.
WIRE_VALUE_CODES = VALUE_ENCODINGS + ("signs",)
#: Magnitudes from here on round to infinity in IEEE half precision (65504 is the largest half).
F16_OVERFLOW = 65520.0
INDEX_CODINGS = ("dense", "varint", "rice", "bitmap")

_INDEX_CODECS = {
    "varint": (kernels.encode_indices, kernels.decode_indices),
    "rice": (kernels.encode_indices_rice, kernels.decode_indices_rice),
    "bitmap": (kernels.encode_indices_bitmap, kernels.decode_indices_bitmap),
}


def value_bytes(encoding: str, k: int) -> int:
    """Exact size of ``k`` values for a wire value code: 4, 2, 1 bytes, 2 bits (ternary) or one
    bit (signs) each."""
    if encoding == "ternary":
        return (k + 3) // 4
    if encoding == "signs":
        return (k + 7) // 8
    return k * {"f32": 4, "f16": 2, "int8": 1}[encoding]


@dataclass(frozen=True)
class CodedCoordinates:
    """A sparse (or dense) vector as it goes on the wire: its codes, scale and two byte blobs."""

    value_code: int
    index_code: int
    scale: float
    indices: bytes
    values: bytes


def encode_coordinates(indices: np.ndarray | None, values: np.ndarray, encoding: str,
                       n: int) -> CodedCoordinates:
    """Code checked ``indices`` (sorted distinct uint32, or None for dense) and float32
    ``values`` for a vector of length ``n``, choosing the shortest index coding."""
    if indices is None:
        coding, index_blob = "dense", b""
    else:
        # Delta-varint suits clustered indices, Rice near-uniform gaps, a bitmap high density:
        # keep the shortest (ties go to the first in this order). A bitmap's size is known
        # without building it (ceil(n / 8)), so it is only built when it would win.
        blobs = {name: bytes(_INDEX_CODECS[name][0](indices, n)) for name in ("varint", "rice")}
        if (n + 7) // 8 < min(len(b) for b in blobs.values()):
            blobs["bitmap"] = bytes(kernels.encode_indices_bitmap(indices, n))
        coding = min(blobs, key=lambda name: len(blobs[name]))
        index_blob = blobs[coding]
    value_code, value_blob, scale = _encode_values(values, encoding)
    return CodedCoordinates(WIRE_VALUE_CODES.index(value_code), INDEX_CODINGS.index(coding),
                            scale, index_blob, value_blob)


def _encode_values(values: np.ndarray, encoding: str) -> tuple[str, bytes, float]:
    """(wire value code, bytes, scale) for ``values``; ternary without zeros goes as signs."""
    if not values.size:
        return encoding, b"", 0.0
    blob, scale = kernels.quantize(values, encoding)
    if encoding == "ternary" and np.all(values != 0):
        # Every value is +-scale: its sign bit alone says which (halves the value bytes).
        return "signs", np.packbits(np.signbit(values), bitorder="little").tobytes(), scale
    return encoding, bytes(blob), scale


def check_codes(value_code: int, index_code: int, n: int, k: int, value_len: int) -> tuple[str, str]:
    """The names of the codes, after checking them against ``n``, ``k`` and the value bytes.

    Raises
    ------
    ValueError
        Naming what is inconsistent.
    """
    if value_code >= len(WIRE_VALUE_CODES):
        raise ValueError(f"unknown value encoding {value_code}")
    if index_code >= len(INDEX_CODINGS):
        raise ValueError(f"unknown index coding {index_code}")
    encoding, coding = WIRE_VALUE_CODES[value_code], INDEX_CODINGS[index_code]
    if k > n or (coding == "dense" and k != n):
        raise ValueError(f"k={k} is inconsistent with {n} parameters and {coding} indices")
    if value_len != value_bytes(encoding, k):
        raise ValueError(f"{k} {encoding} values take {value_bytes(encoding, k)} bytes, the "
                         f"header says {value_len}")
    return encoding, coding


def decode_coordinates(coding: str, encoding: str, n: int, k: int, scale: float,
                       index_blob: bytes, value_blob: bytes):
    """``(indices or None, float32 values)`` from their blobs, every rule of the format checked.

    Raises
    ------
    ValueError
        Truncated, unsorted, duplicate or out-of-range indices, bad padding, NaN or Inf values.
    """
    if coding == "dense" and index_blob:
        raise ValueError("a dense vector carries no index bytes")
    indices = None
    if coding != "dense":
        try:
            indices = _INDEX_CODECS[coding][1](index_blob, n, k)
        except ValueError as exc:  # the kernels name what is wrong (truncated, unsorted, ...)
            raise ValueError(f"{coding} indices: {exc}") from None
        # No second pass over them: every index codec (compiled and twin) returns exactly k
        # strictly increasing indices below n or raises (gap coding makes them increasing by
        # construction, and the kernels' tests hold both to it).
    # The value decoders refuse non-finite results themselves: f32/f16 bit patterns of NaN and
    # Inf, an int8 scale whose 127 multiple overflows; ternary and sign values are +-scale with
    # a finite scale (the caller checks it).
    try:
        if not k:
            values = np.zeros(0, np.float32)
        elif encoding == "signs":
            values = _decode_signs(value_blob, k, scale)
        else:
            values = kernels.dequantize(value_blob, encoding, k, scale)
    except ValueError as exc:
        raise ValueError(f"{encoding} values: {exc}") from None
    return indices, values


def _decode_signs(blob: bytes, k: int, scale: float) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(blob, np.uint8), bitorder="little")
    if bits[k:].any():
        raise ValueError("nonzero padding bits after the last sign")
    return np.where(bits[:k].astype(bool), np.float32(-scale), np.float32(scale))
