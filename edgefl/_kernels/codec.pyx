"""Compact encodings of a sparse update: sorted uint32 indices and float32 values.

Index coders (``idx`` uint32, sorted strictly ascending, every index < n <= 2**32)
--------------------------------------------------------------------------------
``encode_indices``
    Gap-1 coding: g_0 = idx[0], g_i = idx[i] - idx[i-1] - 1, each as an unsigned LEB128 varint
    (7 bits per byte, least significant group first, high bit = more bytes follow; at most 5
    bytes). Only the shortest form is valid, so every index list has exactly one encoding.
``encode_indices_rice``
    Byte 0 holds the Rice parameter r (0..31); then each gap g_i as ``g >> r`` zero bits, a one
    bit, and the low r bits of g (least significant first); bits fill bytes from the least
    significant bit; the last byte is padded with zero bits. r comes from the mean gap
    m = (idx[-1] + 1 - k) / k: with c the smallest integer such that 2**c >= m,
    r = max(c - 1, 0), which minimises the expected code length r + 1 + m / 2**r of geometric gaps.
    k = 0 encodes as the single byte 0.
``encode_indices_bitmap``
    n bits, bit i (bit i % 8 of byte i // 8) set when i is an index; ceil(n / 8) bytes.

Gap-1 coding cannot express an unsorted or repeated index, so the gap decoders only need to check
the range. Decoders take n and the expected count k from the message header and reject, with a
``ValueError`` naming the problem: truncated input, trailing bytes or nonzero padding, varints
longer than 5 bytes or above 32 bits, non-canonical varints, an out-of-range Rice parameter,
indices >= n, and a bitmap popcount != k. They bound k by the buffer's length before allocating
(and never allocate more than k indices), and never read outside the buffer.

Value quantizers (``quantize(vals, kind) -> (bytes, scale)``, little-endian)
---------------------------------------------------------------------------
``"f32"``
    4 bytes per value, exact; scale is 1.0.
``"f16"``
    IEEE half, 2 bytes per value, round to nearest even (NumPy's ``astype(np.float16)``); scale is
    1.0; a value that would round to infinity (|v| >= 65520) is an error.
``"int8"``
    scale = max|v| / 127 rounded down to float32 (so 127 * scale never exceeds max|v| and never
    overflows); code = round-half-even(v / scale), the quotient in float32 as NumPy computes
    ``np.rint(v / scale)``, clipped to [-127, 127] (-128 is never produced and is rejected on
    decode); value = float32(code) * scale. When scale is 0 every code is 0.
``"ternary"``
    Sparse ternary compression (Sattler et al., 2019): every nonzero value becomes +-scale with
    scale = float32(sum |v| / count of nonzero v), the sum accumulated in double in the clip
    kernels' lane order; zeros stay zero. 2 bits per value, four values per byte from the least
    significant bits: 00 zero, 01 +scale, 11 -scale (10 is invalid); padding bits are zero.

Non-finite values are rejected by ``quantize`` and by ``dequantize``; ``dequantize`` checks the
buffer's length against kind and k exactly.
"""
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.float cimport FLT_MAX
from libc.math cimport isfinite, nextafterf
from libc.stdint cimport int8_t, uint16_t
from libc.string cimport memcpy, memset

import sys

import numpy as np

from edgefl._kernels._typedefs cimport float32_t, float64_t, intp_t, uint8_t, uint32_t, uint64_t
from edgefl._kernels.clip cimport edgefl_sum_abs
from edgefl._kernels.codec cimport (
    edgefl_any_non_finite,
    edgefl_ctz8,
    edgefl_dequantize_f16,
    edgefl_dequantize_int8,
    edgefl_max_abs,
    edgefl_pack_ternary,
    edgefl_popcount8,
    edgefl_quantize_f16,
    edgefl_quantize_int8,
)

if sys.byteorder != "little":
    # The loops below copy native words into little-endian messages; the NumPy twin byte-swaps.
    raise ImportError("the compiled codec needs a little-endian host; using the NumPy twin")

from edgefl._kernels.checks.codec import (
    KINDS, check_dequantize_args, check_k, check_kind, check_n, decode_fault, encoded_size,
    indices, values,
)
from edgefl._kernels.docs import document

cnp.import_array()



cdef enum Fault:
    OK
    UNSORTED
    OUT_OF_RANGE
    TRUNCATED
    OVERFLOW
    NON_CANONICAL
    TRAILING
    PADDING
    BAD_CODE
    NON_FINITE


# ---------------------------------------------------------------------------------------------
# argument checks


cdef const uint32_t[::1] _indices(object idx):
    return indices(idx)


cdef const float32_t[::1] _values(object vals):
    return values(vals)


cdef const uint8_t[::1] _buffer(object buf):
    cdef const uint8_t[::1] b
    if isinstance(buf, str):
        raise TypeError("buf must be bytes-like (bytes, bytearray, memoryview), got str")
    try:
        b = buf
    except (TypeError, ValueError, BufferError):
        raise TypeError(
            f"buf must be a contiguous bytes-like object (bytes, bytearray, memoryview), "
            f"got {type(buf).__name__}"
        ) from None
    return b


# ---------------------------------------------------------------------------------------------
# index coders


cdef Fault _scan_indices(const uint32_t *idx, intp_t k, uint64_t n, intp_t *at) noexcept nogil:
    """First index that is not above its predecessor, or not below n."""
    cdef intp_t i
    for i in range(k):
        if i > 0 and idx[i] <= idx[i - 1]:
            at[0] = i
            return UNSORTED
        if idx[i] >= n:
            at[0] = i
            return OUT_OF_RANGE
    return OK


cdef _raise_index_fault(Fault fault, intp_t i, object idx, uint64_t n):
    if fault == UNSORTED:
        raise ValueError(
            f"idx must be sorted strictly ascending: idx[{i}] = {idx[i]} follows "
            f"idx[{i - 1}] = {idx[i - 1]}; sort and deduplicate with np.unique(idx)"
        )
    raise ValueError(f"idx[{i}] = {idx[i]} is out of range for n = {n} (indices must be < n)")


cdef _raise_decode_fault(str coder, Fault fault, intp_t i, Py_ssize_t pos, Py_ssize_t size,
                         intp_t k, uint64_t n, uint64_t value):
    where = decode_fault(coder, n, k)
    if fault == TRUNCATED:
        raise ValueError(where + f"truncated: the {size}-byte buffer ends inside index {i}")
    if fault == OVERFLOW:
        raise ValueError(where + f"the varint of index {i} at byte {pos} exceeds 32 bits or 5 bytes")
    if fault == NON_CANONICAL:
        raise ValueError(
            where + f"the varint of index {i} at byte {pos} is non-canonical (a redundant zero byte)"
        )
    if fault == OUT_OF_RANGE:
        raise ValueError(where + f"index {i} decodes to {value}, out of range (must be < n)")
    if fault == TRAILING:
        raise ValueError(where + f"{size - pos} trailing bytes after the last index")
    if fault == PADDING:
        raise ValueError(where + "nonzero padding bits after the last index")
    raise AssertionError(f"unexpected decode fault {fault}")


cdef inline int _varint_size(uint32_t gap) noexcept nogil:
    return 1 + (gap >= 1u << 7) + (gap >= 1u << 14) + (gap >= 1u << 21) + (gap >= 1u << 28)


def encode_indices(idx, n):
    cdef const uint32_t[::1] v = _indices(idx)
    cdef uint64_t nn = check_n(n)
    cdef intp_t k = v.shape[0], i, at = 0
    cdef const uint32_t *p = &v[0] if k else NULL
    cdef Fault fault
    cdef Py_ssize_t size = 0
    cdef uint64_t next_free = 0
    cdef uint32_t gap
    with nogil:
        fault = _scan_indices(p, k, nn, &at)
        if fault == OK:
            for i in range(k):
                size += _varint_size(<uint32_t>(p[i] - next_free))
                next_free = <uint64_t>p[i] + 1
    if fault != OK:
        _raise_index_fault(fault, at, idx, nn)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t *d = <uint8_t *>PyBytes_AS_STRING(out)
    cdef Py_ssize_t pos = 0
    next_free = 0
    with nogil:
        for i in range(k):
            gap = <uint32_t>(p[i] - next_free)
            next_free = <uint64_t>p[i] + 1
            while gap >= 0x80:
                d[pos] = <uint8_t>(gap | 0x80)
                gap >>= 7
                pos += 1
            d[pos] = <uint8_t>gap
            pos += 1
    return out


def decode_indices(buf, n, k):
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef uint64_t nn = check_n(n)
    cdef intp_t kk = check_k(k, nn)
    cdef Py_ssize_t size = b.shape[0], pos = 0
    if kk > size:
        raise ValueError(
            f"decode_indices: corrupt buffer or wrong header (n = {nn}, k = {kk}): truncated: "
            f"{size} bytes cannot hold {kk} varints"
        )
    out = np.empty(kk, dtype=np.uint32)
    cdef uint32_t *o = <uint32_t *>cnp.PyArray_DATA(out)
    cdef const uint8_t *d = &b[0] if size else NULL
    cdef Fault fault = OK
    cdef intp_t i = 0
    cdef uint64_t value = 0, next_free = 0
    cdef uint32_t byte
    cdef int shift
    with nogil:
        for i in range(kk):
            value = 0
            shift = 0
            while True:
                if pos >= size:
                    fault = TRUNCATED
                    break
                byte = d[pos]
                if shift == 28 and byte > 0x0F:
                    fault = OVERFLOW
                    break
                value |= <uint64_t>(byte & 0x7F) << shift
                pos += 1
                if byte < 0x80:
                    if byte == 0 and shift > 0:
                        fault = NON_CANONICAL
                        pos -= 1
                    break
                shift += 7
            if fault != OK:
                break
            value += next_free
            if value >= nn:
                fault = OUT_OF_RANGE
                break
            o[i] = <uint32_t>value
            next_free = value + 1
        if fault == OK and pos != size:
            fault = TRAILING
    if fault != OK:
        _raise_decode_fault("decode_indices", fault, i, pos, size, kk, nn, value)
    return out


cdef inline void _put_bits(uint8_t *d, uint64_t pos, uint64_t value, int count) noexcept nogil:
    cdef int take
    while count > 0:
        take = 8 - <int>(pos & 7)
        if take > count:
            take = count
        d[pos >> 3] |= <uint8_t>((value & ((1u << take) - 1)) << (pos & 7))
        value >>= take
        pos += take
        count -= take


cdef inline uint64_t _get_bits(const uint8_t *d, uint64_t pos, int count) noexcept nogil:
    cdef uint64_t value = 0
    cdef int take, done = 0
    while done < count:
        take = 8 - <int>(pos & 7)
        if take > count - done:
            take = count - done
        value |= <uint64_t>((d[pos >> 3] >> (pos & 7)) & ((1u << take) - 1)) << done
        pos += take
        done += take
    return value


def encode_indices_rice(idx, n):
    cdef const uint32_t[::1] v = _indices(idx)
    cdef uint64_t nn = check_n(n)
    cdef intp_t k = v.shape[0], i, at = 0
    cdef const uint32_t *p = &v[0] if k else NULL
    cdef Fault fault
    cdef uint64_t total, bits = 0, next_free = 0, gap, pos
    cdef int r = 0, c = 0
    with nogil:
        fault = _scan_indices(p, k, nn, &at)
        if fault == OK and k:
            total = <uint64_t>p[k - 1] + 1 - <uint64_t>k
            while (<uint64_t>k << c) < total:
                c += 1
            r = c - 1 if c > 0 else 0
            for i in range(k):
                bits += ((p[i] - next_free) >> r) + 1 + r
                next_free = <uint64_t>p[i] + 1
    if fault != OK:
        _raise_index_fault(fault, at, idx, nn)
    cdef Py_ssize_t size = 1 + <Py_ssize_t>((bits + 7) >> 3)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t *d = <uint8_t *>PyBytes_AS_STRING(out)
    with nogil:
        memset(d, 0, size)
        d[0] = <uint8_t>r
        pos = 0
        next_free = 0
        for i in range(k):
            gap = p[i] - next_free
            next_free = <uint64_t>p[i] + 1
            pos += gap >> r
            d[1 + (pos >> 3)] |= <uint8_t>(1u << (pos & 7))
            pos += 1
            _put_bits(d + 1, pos, gap, r)
            pos += r
    return out


def decode_indices_rice(buf, n, k):
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef uint64_t nn = check_n(n)
    cdef intp_t kk = check_k(k, nn)
    cdef Py_ssize_t size = b.shape[0]
    where = decode_fault("decode_indices_rice", nn, kk)
    if size == 0:
        raise ValueError(where + "truncated: the Rice parameter byte is missing")
    cdef int r = b[0]
    if r > 31:
        raise ValueError(where + f"Rice parameter {r} in byte 0 is out of range (0..31)")
    cdef uint64_t nbits = <uint64_t>(size - 1) * 8
    if <uint64_t>kk * (r + 1) > nbits:
        raise ValueError(where + f"truncated: {size} bytes cannot hold {kk} gaps of at least {r + 1} bits")
    out = np.empty(kk, dtype=np.uint32)
    cdef uint32_t *o = <uint32_t *>cnp.PyArray_DATA(out)
    # The gaps start after the parameter byte; with no gap bytes this is one past the end,
    # which the loop (k = 0 here) never reads, and indexing b[1] would be out of bounds.
    cdef const uint8_t *d = &b[0] + 1
    cdef Fault fault = OK
    cdef intp_t i = 0
    cdef uint64_t pos = 0, q, value = 0, next_free = 0
    cdef uint32_t window
    cdef int skip
    with nogil:
        for i in range(kk):
            q = 0
            while True:  # the unary quotient: zero bits up to the next one bit
                if pos >= nbits:
                    fault = TRUNCATED
                    break
                window = d[pos >> 3] >> (pos & 7)
                if window:
                    skip = edgefl_ctz8(window)
                    q += skip
                    pos += skip + 1
                    break
                skip = 8 - <int>(pos & 7)
                q += skip
                pos += skip
            if fault != OK:
                break
            if pos + r > nbits:
                fault = TRUNCATED
                break
            # A quotient of 2**(33 - r) or more puts the index past 2**32 >= n: saturate there
            # rather than shift out of 64 bits.
            if q >> (33 - r):
                value = 1ULL << 33
            else:
                value = (q << r) | _get_bits(d, pos, r)
            pos += r
            value += next_free
            if value >= nn:
                fault = OUT_OF_RANGE
                break
            o[i] = <uint32_t>value
            next_free = value + 1
        if fault == OK:
            if nbits - pos >= 8:
                fault = TRAILING
            elif pos < nbits and (d[pos >> 3] >> (pos & 7)):
                fault = PADDING
    if fault != OK:
        _raise_decode_fault("decode_indices_rice", fault, i, 1 + <Py_ssize_t>((pos + 7) >> 3), size,
                            kk, nn, value)
    return out


def encode_indices_bitmap(idx, n):
    cdef const uint32_t[::1] v = _indices(idx)
    cdef uint64_t nn = check_n(n)
    cdef intp_t k = v.shape[0], i, at = 0
    cdef const uint32_t *p = &v[0] if k else NULL
    cdef Fault fault
    with nogil:
        fault = _scan_indices(p, k, nn, &at)
    if fault != OK:
        _raise_index_fault(fault, at, idx, nn)
    cdef Py_ssize_t size = <Py_ssize_t>((nn + 7) >> 3)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t *d = <uint8_t *>PyBytes_AS_STRING(out)
    with nogil:
        memset(d, 0, size)
        for i in range(k):
            d[p[i] >> 3] |= <uint8_t>(1u << (p[i] & 7))
    return out


def decode_indices_bitmap(buf, n, k):
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef uint64_t nn = check_n(n)
    cdef intp_t kk = check_k(k, nn)
    cdef Py_ssize_t size = b.shape[0], expected = <Py_ssize_t>((nn + 7) >> 3), j
    where = decode_fault("decode_indices_bitmap", nn, kk)
    if size < expected:
        raise ValueError(where + f"truncated: {size} bytes, an {nn}-bit bitmap needs {expected}")
    if size > expected:
        raise ValueError(where + f"{size - expected} trailing bytes after the {expected}-byte bitmap")
    cdef const uint8_t *d = &b[0] if size else NULL
    cdef uint64_t count = 0
    cdef bint padding = False
    with nogil:
        for j in range(size):
            count += edgefl_popcount8(d[j])
        if nn & 7:
            padding = (d[size - 1] >> (nn & 7)) != 0
    if padding:
        raise ValueError(where + "bits set beyond n in the last byte (indices out of range)")
    if count != <uint64_t>kk:
        raise ValueError(where + f"the bitmap has {count} bits set, the header says k = {kk}")
    out = np.empty(kk, dtype=np.uint32)
    cdef uint32_t *o = <uint32_t *>cnp.PyArray_DATA(out)
    cdef intp_t i = 0
    cdef uint32_t byte
    with nogil:
        for j in range(size):
            byte = d[j]
            while byte:
                o[i] = <uint32_t>(j * 8 + edgefl_ctz8(byte))
                i += 1
                byte &= byte - 1
    return out


# ---------------------------------------------------------------------------------------------
# value quantizers


def quantize(vals, kind):
    cdef const float32_t[::1] v = _values(vals)
    cdef str k_ind = check_kind(kind)
    cdef intp_t k = v.shape[0], i, nonzero = 0
    cdef const float32_t *p = &v[0] if k else NULL
    cdef bint bad
    with nogil:
        bad = edgefl_any_non_finite(p, k)
    if bad:
        at = int(np.flatnonzero(~np.isfinite(vals))[0])
        raise ValueError(
            f"vals contains a non-finite value ({vals[at]} at index {at}); quantize only finite values"
        )
    cdef Py_ssize_t size = encoded_size(k_ind, k)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t *d = <uint8_t *>PyBytes_AS_STRING(out)
    cdef float32_t scale = 1.0
    cdef float64_t step
    if k_ind == "f32":
        with nogil:
            if k:
                memcpy(d, p, 4 * k)
    elif k_ind == "f16":
        with nogil:
            bad = edgefl_quantize_f16(p, k, <uint16_t *>d)
        if bad:
            at = int(np.flatnonzero(np.abs(vals) >= 65520)[0])
            raise ValueError(
                f"vals[{at}] = {vals[at]} is beyond float16's range (|v| < 65520); "
                "use kind 'f32' or 'int8', or scale the values first"
            )
    elif k_ind == "int8":
        with nogil:
            step = <float64_t>edgefl_max_abs(p, k) / 127.0
            scale = <float32_t>step
            if scale > step:
                scale = nextafterf(scale, 0)
            if scale == 0:
                memset(d, 0, size)
            else:
                edgefl_quantize_int8(p, k, scale, <int8_t *>d)
    else:
        with nogil:
            for i in range(k):
                nonzero += p[i] != 0
            if nonzero:
                scale = <float32_t>(edgefl_sum_abs(p, k) / nonzero)
            else:
                scale = 0.0
            edgefl_pack_ternary(p, k, d)
    return out, float(scale)


def dequantize(buf, kind, k, scale):
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef Py_ssize_t size = b.shape[0]
    k_ind, count, scale32 = check_dequantize_args(size, kind, k, scale)
    cdef float32_t s32 = scale32
    cdef intp_t kk = count, i, at = 0
    out = np.empty(kk, dtype=np.float32)
    cdef float32_t *o = <float32_t *>cnp.PyArray_DATA(out)
    if k_ind == "f16" and size and <size_t>&b[0] & 1:
        b = bytes(b)  # a view at an odd address: copy so the halves can be read as uint16
    cdef const uint8_t *d = &b[0] if size else NULL
    cdef Fault fault = OK
    cdef uint32_t code
    cdef int kind_code = KINDS.index(k_ind)  # compared without the GIL below
    with nogil:
        if kind_code == 0:
            if kk:
                memcpy(o, d, 4 * kk)
            if edgefl_any_non_finite(o, kk):
                fault = NON_FINITE
        elif kind_code == 1:
            if edgefl_dequantize_f16(<const uint16_t *>d, kk, o):
                fault = NON_FINITE
        elif kind_code == 2:
            if edgefl_dequantize_int8(<const int8_t *>d, kk, s32, o):
                fault = BAD_CODE
        else:
            for i in range(kk):
                code = (d[i >> 2] >> (2 * (i & 3))) & 3
                if code == 2:
                    fault = BAD_CODE
                    at = i
                    break
                o[i] = 0 if code == 0 else (s32 if code == 1 else -s32)
            if fault == OK and kk & 3 and d[size - 1] >> (2 * (kk & 3)):
                fault = PADDING
    where = f"dequantize: corrupt buffer ({k_ind!r}, k = {kk}): "
    if fault == NON_FINITE:
        if kind_code == 1:
            at = int(np.flatnonzero(np.frombuffer(buf, "<u2") & 0x7C00 == 0x7C00)[0])
        else:
            at = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(where + f"value {at} is not finite")
    if fault == BAD_CODE:
        if kind_code == 2:
            at = int(np.flatnonzero(np.frombuffer(buf, np.int8) == -128)[0])
        raise ValueError(where + f"value {at} has an invalid code (int8 -128 or ternary 0b10)")
    if fault == PADDING:
        raise ValueError(where + "nonzero padding bits after the last value")
    return out


document(encode_indices, decode_indices, encode_indices_rice, decode_indices_rice, encode_indices_bitmap, decode_indices_bitmap, quantize, dequantize)
