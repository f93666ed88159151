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

import operator
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

cnp.import_array()

KINDS = ("f32", "f16", "int8", "ternary")


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
    if not isinstance(idx, np.ndarray):
        raise TypeError(f"idx must be a numpy.ndarray of uint32, got {type(idx).__name__}")
    if idx.dtype != np.uint32:
        raise TypeError(f"idx must have dtype uint32, got {idx.dtype}; convert with idx.astype(np.uint32)")
    if idx.ndim != 1:
        raise ValueError(f"idx must be 1-D, got shape {idx.shape}")
    if not idx.flags.c_contiguous:
        raise ValueError("idx must be C-contiguous; pass np.ascontiguousarray(idx)")
    return idx


cdef const float32_t[::1] _values(object vals):
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


cdef uint64_t _check_n(object n) except? 0:
    try:
        value = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__}") from None
    if not 0 <= value <= 2**32:
        raise ValueError(f"n must be in [0, 2**32] (indices are uint32), got {value}")
    return value


cdef intp_t _check_k(object k, uint64_t n) except -1:
    try:
        value = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if not 0 <= value <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {value}")
    return value


cdef str _check_kind(object kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind


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
    where = f"{coder}: corrupt buffer or wrong header (n = {n}, k = {k}): "
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
    """Encode sorted indices as gap-1 LEB128 varints.

    Parameters
    ----------
    idx : numpy.ndarray
        uint32, 1-D, C-contiguous, sorted strictly ascending, every index < n.
    n : int
        The dense length, 0 <= n <= 2**32.

    Returns
    -------
    bytes
        The encoding (between k and 5k bytes), see the module docstring.

    Raises
    ------
    TypeError
        ``idx`` is not a uint32 ndarray or ``n`` is not an integer.
    ValueError
        ``idx`` is not 1-D and contiguous, not strictly ascending, or has an index >= n.
    """
    cdef const uint32_t[::1] v = _indices(idx)
    cdef uint64_t nn = _check_n(n)
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
    """Decode the output of :func:`encode_indices`, checking it against the header's n and k.

    Parameters
    ----------
    buf : bytes-like
        The encoded indices, nothing before or after them.
    n : int
        The dense length from the message header, 0 <= n <= 2**32.
    k : int
        The number of indices from the message header, 0 <= k <= n.

    Returns
    -------
    numpy.ndarray
        k uint32 indices, sorted strictly ascending, all < n.

    Raises
    ------
    TypeError
        ``buf`` is not bytes-like, or ``n`` or ``k`` is not an integer.
    ValueError
        ``n`` or ``k`` is out of range, or the buffer is truncated, has trailing bytes, an
        over-long, over-large or non-canonical varint, or decodes to an index >= n.
    """
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef uint64_t nn = _check_n(n)
    cdef intp_t kk = _check_k(k, nn)
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
    """Encode sorted indices as Golomb-Rice coded gaps.

    Parameters
    ----------
    idx : numpy.ndarray
        uint32, 1-D, C-contiguous, sorted strictly ascending, every index < n.
    n : int
        The dense length, 0 <= n <= 2**32.

    Returns
    -------
    bytes
        The Rice parameter byte, then the coded gaps (see the module docstring).

    Raises
    ------
    TypeError
        ``idx`` is not a uint32 ndarray or ``n`` is not an integer.
    ValueError
        ``idx`` is not 1-D and contiguous, not strictly ascending, or has an index >= n.
    """
    cdef const uint32_t[::1] v = _indices(idx)
    cdef uint64_t nn = _check_n(n)
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
    """Decode the output of :func:`encode_indices_rice`, checking it against the header.

    Parameters
    ----------
    buf : bytes-like
        The Rice parameter byte and the coded gaps, nothing after them.
    n : int
        The dense length from the message header, 0 <= n <= 2**32.
    k : int
        The number of indices from the message header, 0 <= k <= n.

    Returns
    -------
    numpy.ndarray
        k uint32 indices, sorted strictly ascending, all < n.

    Raises
    ------
    TypeError
        ``buf`` is not bytes-like, or ``n`` or ``k`` is not an integer.
    ValueError
        ``n`` or ``k`` is out of range, or the buffer is empty or truncated, has a Rice parameter
        above 31, trailing bytes or nonzero padding, or decodes to an index >= n.
    """
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef uint64_t nn = _check_n(n)
    cdef intp_t kk = _check_k(k, nn)
    cdef Py_ssize_t size = b.shape[0]
    where = f"decode_indices_rice: corrupt buffer or wrong header (n = {nn}, k = {kk}): "
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
    """Encode sorted indices as an n-bit bitmap (least significant bit first).

    Parameters
    ----------
    idx : numpy.ndarray
        uint32, 1-D, C-contiguous, sorted strictly ascending, every index < n.
    n : int
        The dense length, 0 <= n <= 2**32.

    Returns
    -------
    bytes
        ``ceil(n / 8)`` bytes; bit i % 8 of byte i // 8 is set when i is in ``idx``.

    Raises
    ------
    TypeError
        ``idx`` is not a uint32 ndarray or ``n`` is not an integer.
    ValueError
        ``idx`` is not 1-D and contiguous, not strictly ascending, or has an index >= n.
    """
    cdef const uint32_t[::1] v = _indices(idx)
    cdef uint64_t nn = _check_n(n)
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
    """Decode the output of :func:`encode_indices_bitmap`, checking it against the header.

    Parameters
    ----------
    buf : bytes-like
        Exactly ``ceil(n / 8)`` bytes.
    n : int
        The dense length from the message header, 0 <= n <= 2**32.
    k : int
        The number of indices from the message header, 0 <= k <= n.

    Returns
    -------
    numpy.ndarray
        k uint32 indices, sorted strictly ascending, all < n.

    Raises
    ------
    TypeError
        ``buf`` is not bytes-like, or ``n`` or ``k`` is not an integer.
    ValueError
        ``n`` or ``k`` is out of range, the length is not ``ceil(n / 8)``, a padding bit (an index
        >= n) is set, or the number of set bits is not k.
    """
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef uint64_t nn = _check_n(n)
    cdef intp_t kk = _check_k(k, nn)
    cdef Py_ssize_t size = b.shape[0], expected = <Py_ssize_t>((nn + 7) >> 3), j
    where = f"decode_indices_bitmap: corrupt buffer or wrong header (n = {nn}, k = {kk}): "
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


cdef Py_ssize_t _encoded_size(str kind, intp_t k):
    if kind == "f32":
        return 4 * k
    if kind == "f16":
        return 2 * k
    if kind == "int8":
        return k
    return (k + 3) // 4


def quantize(vals, kind):
    """Quantize float32 values for the wire.

    Parameters
    ----------
    vals : numpy.ndarray
        float32, 1-D, C-contiguous, all finite.
    kind : {"f32", "f16", "int8", "ternary"}
        The encoding; see the module docstring for each rule.

    Returns
    -------
    data : bytes
        The encoded values, little-endian.
    scale : float
        1.0 for "f32" and "f16"; the float32 step for "int8"; the float32 magnitude for "ternary".

    Raises
    ------
    TypeError
        ``vals`` is not a float32 ndarray.
    ValueError
        ``vals`` is not 1-D and contiguous, holds NaN or Inf, ``kind`` is unknown, or (for "f16")
        a value is beyond half precision's range.
    """
    cdef const float32_t[::1] v = _values(vals)
    cdef str k_ind = _check_kind(kind)
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
    cdef Py_ssize_t size = _encoded_size(k_ind, k)
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
    """Decode the output of :func:`quantize`.

    Parameters
    ----------
    buf : bytes-like
        Exactly the bytes ``quantize`` produced for k values of this kind.
    kind : {"f32", "f16", "int8", "ternary"}
        The encoding.
    k : int
        The number of values (from the message header), >= 0.
    scale : float
        The scale ``quantize`` returned: 1.0 for "f32" and "f16", finite and >= 0 otherwise.

    Returns
    -------
    numpy.ndarray
        k float32 values.

    Raises
    ------
    TypeError
        ``buf`` is not bytes-like, ``k`` is not an integer or ``scale`` not a number.
    ValueError
        ``kind`` is unknown, the length does not match kind and k, ``scale`` is invalid, or the
        buffer holds NaN/Inf, the int8 code -128, the ternary code 10 or nonzero padding.
    """
    cdef const uint8_t[::1] b = _buffer(buf)
    cdef str k_ind = _check_kind(kind)
    try:
        count = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if count < 0:
        raise ValueError(f"k must be >= 0, got {count}")
    cdef Py_ssize_t size = b.shape[0]
    expected = {"f32": 4 * count, "f16": 2 * count, "int8": count, "ternary": (count + 3) // 4}[k_ind]
    if size != expected:
        raise ValueError(
            f"dequantize: buf has {size} bytes, kind {k_ind!r} with k = {count} needs exactly "
            f"{expected}: the buffer is corrupt or the header does not match it"
        )
    cdef float64_t s
    try:
        s = scale
    except TypeError:
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}") from None
    if k_ind in ("f32", "f16"):
        if s != 1.0:
            raise ValueError(f"scale must be 1.0 for kind {k_ind!r} (quantize returns 1.0), got {scale!r}")
    elif not (isfinite(<float32_t>s) and s >= 0):
        raise ValueError(f"scale must be finite and >= 0 for kind {k_ind!r}, got {scale!r}")
    elif k_ind == "int8" and <float32_t>s > FLT_MAX / 127:
        raise ValueError(
            f"scale {scale!r} is too large for kind 'int8': 127 * scale overflows float32 "
            "(quantize never returns such a scale)"
        )
    cdef float32_t s32 = <float32_t>s
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
