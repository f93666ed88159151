"""Compact encodings of a sparse update, in NumPy: the twin of the compiled ``codec``.

The formats are specified in the compiled module's docstring (``edgefl/_kernels/codec.pyx``); this
module produces the same bytes and values and raises the same errors. Encoders, quantizers and the
bitmap decoder are vectorised; the varint decoder is too for valid buffers. To report a corrupt
buffer's first fault as the compiled loop does, the varint decoder then walks it element by
element, and the Rice decoder always does (each code's start depends on the previous one).
"""

import numpy as np

from edgefl._kernels.checks.codec import (check_dequantize_args, check_k, check_kind, check_n,
                                          decode_fault, indices, values)
from edgefl._kernels.fallback.clip import lane_sum
from edgefl._kernels.docs import document


def _buffer(buf):
    if isinstance(buf, str):
        raise TypeError("buf must be bytes-like (bytes, bytearray, memoryview), got str")
    try:
        view = memoryview(buf)
    except TypeError:
        view = None
    if view is None or view.ndim != 1 or view.format != "B" or not view.c_contiguous:
        raise TypeError(
            f"buf must be a contiguous bytes-like object (bytes, bytearray, memoryview), "
            f"got {type(buf).__name__}"
        )
    return np.frombuffer(view, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# index coders


def _checked_gaps(idx, n):
    """The gap-1 values of valid indices, or the error for the first invalid one."""
    idx = indices(idx)
    n = check_n(n)
    wide = idx.astype(np.int64)
    unsorted = np.flatnonzero(np.diff(wide) <= 0) + 1
    out_of_range = np.flatnonzero(wide >= n)
    first_unsorted = int(unsorted[0]) if unsorted.size else idx.size
    first_out = int(out_of_range[0]) if out_of_range.size else idx.size
    if first_unsorted <= first_out and first_unsorted < idx.size:
        i = first_unsorted
        raise ValueError(
            f"idx must be sorted strictly ascending: idx[{i}] = {idx[i]} follows "
            f"idx[{i - 1}] = {idx[i - 1]}; sort and deduplicate with np.unique(idx)"
        )
    if first_out < idx.size:
        raise ValueError(
            f"idx[{first_out}] = {idx[first_out]} is out of range for n = {n} (indices must be < n)"
        )
    return np.diff(wide, prepend=-1) - 1, n


def encode_indices(idx, n):
    gaps, _ = _checked_gaps(idx, n)
    sizes = 1 + sum((gaps >= 1 << (7 * b)).astype(np.int64) for b in range(1, 5))
    starts = np.cumsum(sizes) - sizes
    out = np.zeros(int(sizes.sum()), dtype=np.uint8)
    for b in range(5):
        more = sizes > b
        group = (gaps[more] >> (7 * b)) & 0x7F
        out[starts[more] + b] = group | np.where(sizes[more] > b + 1, 0x80, 0)
    return out.tobytes()


def _decode_valid_varints(data, n, k):
    """The indices if ``data`` is exactly k valid varints of indices < n, else None (vectorised)."""
    ends = np.flatnonzero(data < 0x80)  # the last byte of each varint
    if ends.size != k or (k and ends[-1] != data.size - 1) or (not k and data.size):
        return None
    starts = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - starts + 1
    last = data[ends]
    if np.any(sizes > 5) or np.any((sizes == 5) & (last > 0x0F)) or np.any((sizes > 1) & (last == 0)):
        return None
    gaps = np.zeros(k, np.int64)
    for b in range(5):
        more = sizes > b
        gaps[more] |= (data[starts[more] + b] & 0x7F).astype(np.int64) << (7 * b)
    idx = np.cumsum(gaps + 1) - 1
    if k and idx[-1] >= n:
        return None
    return idx.astype(np.uint32)


def decode_indices(buf, n, k):
    data = _buffer(buf)
    n = check_n(n)
    k = check_k(k, n)
    where = decode_fault("decode_indices", n, k)
    size = data.size
    if k > size:
        raise ValueError(where + f"truncated: {size} bytes cannot hold {k} varints")
    valid = _decode_valid_varints(data, n, k)
    if valid is not None:
        return valid
    # Something is wrong: walk the buffer as the compiled decoder does, to report its first fault.
    data = data.tolist()
    out = np.empty(k, dtype=np.uint32)
    pos = 0
    next_free = 0
    for i in range(k):
        value = 0
        shift = 0
        while True:
            if pos >= size:
                raise ValueError(where + f"truncated: the {size}-byte buffer ends inside index {i}")
            byte = data[pos]
            if shift == 28 and byte > 0x0F:
                raise ValueError(where + f"the varint of index {i} at byte {pos} exceeds 32 bits or 5 bytes")
            value |= (byte & 0x7F) << shift
            pos += 1
            if byte < 0x80:
                if byte == 0 and shift > 0:
                    raise ValueError(
                        where + f"the varint of index {i} at byte {pos - 1} is non-canonical "
                        "(a redundant zero byte)"
                    )
                break
            shift += 7
        value += next_free
        if value >= n:
            raise ValueError(where + f"index {i} decodes to {value}, out of range (must be < n)")
        out[i] = value
        next_free = value + 1
    if pos != size:
        raise ValueError(where + f"{size - pos} trailing bytes after the last index")
    return out


def _rice_parameter(total, k):
    c = 0
    while (k << c) < total:
        c += 1
    return max(c - 1, 0)


def encode_indices_rice(idx, n):
    gaps, _ = _checked_gaps(idx, n)
    k = gaps.size
    r = _rice_parameter(int(gaps.sum()), k) if k else 0
    quotients = gaps >> r
    # bit offset of each gap's terminating one bit; its remainder's r bits follow it
    ends = np.cumsum(quotients + 1 + r) - r - 1
    nbits = int(ends[-1]) + 1 + r if k else 0
    bits = np.zeros(nbits, dtype=np.uint8)
    bits[ends] = 1
    for b in range(r):
        bits[ends + 1 + b] = (gaps >> b) & 1
    return bytes([r]) + np.packbits(bits, bitorder="little").tobytes()


def decode_indices_rice(buf, n, k):
    data = _buffer(buf)
    n = check_n(n)
    k = check_k(k, n)
    where = decode_fault("decode_indices_rice", n, k)
    size = data.size
    if size == 0:
        raise ValueError(where + "truncated: the Rice parameter byte is missing")
    r = int(data[0])
    if r > 31:
        raise ValueError(where + f"Rice parameter {r} in byte 0 is out of range (0..31)")
    nbits = (size - 1) * 8
    if k * (r + 1) > nbits:
        raise ValueError(where + f"truncated: {size} bytes cannot hold {k} gaps of at least {r + 1} bits")
    bits = np.unpackbits(data[1:], bitorder="little")
    ones = np.flatnonzero(bits).tolist()
    out = np.empty(k, dtype=np.uint32)
    pos = 0
    next_free = 0
    cursor = 0  # into ones: the first set bit at or after pos
    for i in range(k):
        while cursor < len(ones) and ones[cursor] < pos:
            cursor += 1
        if cursor == len(ones):
            raise ValueError(where + f"truncated: the {size}-byte buffer ends inside index {i}")
        q = ones[cursor] - pos
        pos = ones[cursor] + 1
        if pos + r > nbits:
            raise ValueError(where + f"truncated: the {size}-byte buffer ends inside index {i}")
        remainder = 0
        for b in range(r):
            remainder |= int(bits[pos + b]) << b
        value = 1 << 33 if q >> (33 - r) else (q << r) | remainder
        pos += r
        value += next_free
        if value >= n:
            raise ValueError(where + f"index {i} decodes to {value}, out of range (must be < n)")
        out[i] = value
        next_free = value + 1
    if nbits - pos >= 8:
        raise ValueError(where + f"{size - (1 + ((pos + 7) >> 3))} trailing bytes after the last index")
    if bits[pos:].any():
        raise ValueError(where + "nonzero padding bits after the last index")
    return out


def encode_indices_bitmap(idx, n):
    _, n = _checked_gaps(idx, n)
    out = np.zeros((n + 7) // 8, dtype=np.uint8)
    np.bitwise_or.at(out, idx >> 3, (1 << (idx & 7)).astype(np.uint8))
    return out.tobytes()


def decode_indices_bitmap(buf, n, k):
    data = _buffer(buf)
    n = check_n(n)
    k = check_k(k, n)
    where = decode_fault("decode_indices_bitmap", n, k)
    size, expected = data.size, (n + 7) // 8
    if size < expected:
        raise ValueError(where + f"truncated: {size} bytes, an {n}-bit bitmap needs {expected}")
    if size > expected:
        raise ValueError(where + f"{size - expected} trailing bytes after the {expected}-byte bitmap")
    count = int(np.bitwise_count(data).sum(dtype=np.uint64))
    if n & 7 and int(data[-1]) >> (n & 7):
        raise ValueError(where + "bits set beyond n in the last byte (indices out of range)")
    if count != k:
        raise ValueError(where + f"the bitmap has {count} bits set, the header says k = {k}")
    return np.flatnonzero(np.unpackbits(data, bitorder="little")).astype(np.uint32)


# ---------------------------------------------------------------------------------------------
# value quantizers


def quantize(vals, kind):
    vals = values(vals)
    kind = check_kind(kind)
    bad = np.flatnonzero(~np.isfinite(vals))
    if bad.size:
        at = int(bad[0])
        raise ValueError(
            f"vals contains a non-finite value ({vals[at]} at index {at}); quantize only finite values"
        )
    if kind == "f32":
        return vals.astype("<f4").tobytes(), 1.0
    if kind == "f16":
        with np.errstate(over="ignore"):
            halves = vals.astype("<f2")
        over = np.flatnonzero(np.isinf(halves))
        if over.size:
            at = int(over[0])
            raise ValueError(
                f"vals[{at}] = {vals[at]} is beyond float16's range (|v| < 65520); "
                "use kind 'f32' or 'int8', or scale the values first"
            )
        return halves.tobytes(), 1.0
    if kind == "int8":
        magnitude = np.abs(vals).max() if vals.size else np.float32(0)
        step = float(magnitude) / 127.0
        scale = np.float32(step)
        if float(scale) > step:  # round down: 127 * scale never exceeds max|v|
            scale = np.nextafter(scale, np.float32(0))
        if scale == 0:
            return bytes(vals.size), 0.0
        codes = np.clip(np.rint(vals / scale), -127, 127)  # float32 quotient, as in C
        return codes.astype(np.int8).tobytes(), float(scale)
    nonzero = int(np.count_nonzero(vals))
    scale = np.float32(lane_sum(np.abs(vals.astype(np.float64))) / nonzero) if nonzero else np.float32(0)
    codes = np.where(vals < 0, 3, np.where(vals > 0, 1, 0)).astype(np.uint8)
    codes = np.concatenate((codes, np.zeros(-vals.size % 4, dtype=np.uint8))).reshape(-1, 4)
    packed = codes[:, 0] | codes[:, 1] << 2 | codes[:, 2] << 4 | codes[:, 3] << 6
    return packed.astype(np.uint8).tobytes(), float(scale)


def dequantize(buf, kind, k, scale):
    data = _buffer(buf)
    kind, count, s32 = check_dequantize_args(data.size, kind, k, scale)
    where = f"dequantize: corrupt buffer ({kind!r}, k = {count}): "
    if kind in ("f32", "f16"):
        values = data.view("<f4" if kind == "f32" else "<f2").astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(where + f"value {int(bad[0])} is not finite")
        return values
    if kind == "int8":
        codes = data.view(np.int8)
        bad = np.flatnonzero(codes == -128)
        if bad.size:
            raise ValueError(where + f"value {int(bad[0])} has an invalid code (int8 -128 or ternary 0b10)")
        return codes.astype(np.float32) * s32
    codes = ((data[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(-1)
    bad = np.flatnonzero(codes[:count] == 2)
    if bad.size:
        raise ValueError(where + f"value {int(bad[0])} has an invalid code (int8 -128 or ternary 0b10)")
    if codes[count:].any():
        raise ValueError(where + "nonzero padding bits after the last value")
    table = np.array([0, s32, 0, -s32], dtype=np.float32)
    return table[codes[:count]]


document(encode_indices, decode_indices, encode_indices_rice, decode_indices_rice, encode_indices_bitmap, decode_indices_bitmap, quantize, dequantize)
