"""The arguments of the index coders and value quantizers: idx, vals, n, k, kind; decode errors' prefix.

Shared by the compiled module and its NumPy twin, so both reject the same arguments with the
same words.
"""
from __future__ import annotations

import math
import operator

import numpy as np



KINDS = ("f32", "f16", "int8", "ternary")


def indices(idx):
    if not isinstance(idx, np.ndarray):
        raise TypeError(f"idx must be a numpy.ndarray of uint32, got {type(idx).__name__}")
    if idx.dtype != np.uint32:
        raise TypeError(f"idx must have dtype uint32, got {idx.dtype}; convert with idx.astype(np.uint32)")
    if idx.ndim != 1:
        raise ValueError(f"idx must be 1-D, got shape {idx.shape}")
    if not idx.flags.c_contiguous:
        raise ValueError("idx must be C-contiguous; pass np.ascontiguousarray(idx)")
    return idx


def values(vals):
    if not isinstance(vals, np.ndarray):
        raise TypeError(f"vals must be a numpy.ndarray of float32, got {type(vals).__name__}")
    if vals.dtype != np.float32:
        raise TypeError(
            f"vals must have dtype float32, got {vals.dtype}; convert with vals.astype(np.float32)"
        )
    if vals.ndim != 1:
        raise ValueError(f"vals must be 1-D, got shape {vals.shape}")
    if not vals.flags.c_contiguous:
        raise ValueError("vals must be C-contiguous; pass np.ascontiguousarray(vals)")
    return vals


def check_n(n):
    try:
        value = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__}") from None
    if not 0 <= value <= 2**32:
        raise ValueError(f"n must be in [0, 2**32] (indices are uint32), got {value}")
    return value


def check_k(k, n):
    try:
        value = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if not 0 <= value <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {value}")
    return value


def check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind


def decode_fault(coder, n, k):
    return f"{coder}: corrupt buffer or wrong header (n = {n}, k = {k}): "


def encoded_size(kind, k):
    """Bytes that k values take in ``kind`` (the length dequantize requires exactly)."""
    return {"f32": 4 * k, "f16": 2 * k, "int8": k, "ternary": (k + 3) // 4}[kind]


def check_dequantize_args(size, kind, k, scale):
    """``(kind, k, scale as float32)`` for dequantize of a ``size``-byte buffer, or the error."""
    kind = check_kind(kind)
    try:
        count = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if count < 0:
        raise ValueError(f"k must be >= 0, got {count}")
    expected = encoded_size(kind, count)
    if size != expected:
        raise ValueError(
            f"dequantize: buf has {size} bytes, kind {kind!r} with k = {count} needs exactly "
            f"{expected}: the buffer is corrupt or the header does not match it"
        )
    try:
        if isinstance(scale, (str, bytes, bytearray)):
            raise TypeError
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}") from None
    if kind in ("f32", "f16"):
        if s != 1.0:
            raise ValueError(f"scale must be 1.0 for kind {kind!r} (quantize returns 1.0), got {scale!r}")
    else:
        with np.errstate(over="ignore"):
            finite = math.isfinite(np.float32(s))
        if not (finite and s >= 0):
            raise ValueError(f"scale must be finite and >= 0 for kind {kind!r}, got {scale!r}")
        if kind == "int8" and np.float32(s) > np.finfo(np.float32).max / np.float32(127):
            raise ValueError(
                f"scale {scale!r} is too large for kind 'int8': 127 * scale overflows float32 "
                "(quantize never returns such a scale)"
            )
    s32 = np.float32(s)
    return kind, count, s32
