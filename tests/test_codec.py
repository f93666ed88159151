"""Index coders and value quantizers: round trips, the NumPy twin, known bytes, strict decoding."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from backends import COMPILED, both_backends
from edgefl._kernels.fallback import codec as twin

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.kernels, pytest.mark.cpu]

CODERS = [
    ("encode_indices", "decode_indices"),
    ("encode_indices_rice", "decode_indices_rice"),
    ("encode_indices_bitmap", "decode_indices_bitmap"),
]
DECODERS = [decode for _, decode in CODERS]
KINDS = ["f32", "f16", "int8", "ternary"]


def outcome(fn, *args):
    """What a call did: ("ok", result) or (error type, message)."""
    try:
        return "ok", fn(*args)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


@st.composite
def index_sets(draw, max_n=5000):
    n = draw(st.integers(0, max_n))
    chosen = draw(st.sets(st.integers(0, n - 1), max_size=min(n, 300))) if n else set()
    return np.array(sorted(chosen), dtype=np.uint32), n


# ---------------------------------------------------------------------------------------------
# index coders


@pytest.mark.parametrize("encode, decode", CODERS)
@settings(max_examples=120, deadline=None)
@given(case=index_sets())
def test_round_trip_and_twin(encode, decode, case):
    idx, n = case
    data = getattr(COMPILED, encode)(idx, n)
    assert isinstance(data, bytes)
    assert data == getattr(twin, encode)(idx, n)
    back = getattr(COMPILED, decode)(data, n, idx.size)
    assert back.dtype == np.uint32
    assert np.array_equal(back, idx)
    assert np.array_equal(getattr(twin, decode)(data, n, idx.size), idx)


@pytest.mark.parametrize("encode, decode", CODERS[:2])
@pytest.mark.parametrize("idx", [[], [0], [2**32 - 1], [0, 2**32 - 1], [5, 2**31, 2**32 - 2, 2**32 - 1]])
def test_extremes_of_the_uint32_range(encode, decode, idx):
    idx = np.array(idx, dtype=np.uint32)
    data = getattr(COMPILED, encode)(idx, 2**32)
    assert data == getattr(twin, encode)(idx, 2**32)
    assert np.array_equal(getattr(COMPILED, decode)(data, 2**32, idx.size), idx)


@both_backends
def test_known_bytes(K):
    idx = np.array([0, 1, 2, 300], dtype=np.uint32)
    # gaps 0, 0, 0, 297 = 2 * 128 + 41
    assert K.encode_indices(idx, 1000) == bytes([0, 0, 0, 0x80 | 41, 2])
    assert K.encode_indices(np.array([2**32 - 1], np.uint32), 2**32) == bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
    # all gaps 0: r = 0 and four terminating one bits
    assert K.encode_indices_rice(np.arange(4, dtype=np.uint32), 10) == bytes([0, 0x0F])
    # gaps 8, 8: mean 8, r = 2; each gap is 2 zeros, a one, then 00 -> bits 0010 0 0010 0
    assert K.encode_indices_rice(np.array([8, 17], np.uint32), 20) == bytes([2, 0b10000100, 0b00])
    assert K.encode_indices_bitmap(np.array([0, 9], np.uint32), 10) == bytes([0x01, 0x02])
    assert K.encode_indices_rice(np.zeros(0, np.uint32), 10) == b"\x00"


@both_backends
def test_rice_parameter_follows_the_mean_gap(K):
    rng = np.random.default_rng(4)
    for mean_gap in [1, 3, 20, 700, 50_000]:
        idx = np.unique(rng.integers(0, 200 * mean_gap, 200)).astype(np.uint32)
        gaps = np.diff(idx.astype(np.int64), prepend=-1) - 1
        r = K.encode_indices_rice(idx, 200 * mean_gap)[0]
        assert 2 ** (r + 1) >= gaps.mean() or r == 0
        assert r == 0 or 2**r < gaps.mean()
        # the chosen parameter is never worse than its neighbours by more than a bit per index
        cost = {s: int(((gaps >> s) + 1 + s).sum()) for s in range(0, 32)}
        assert cost[r] <= min(cost.values()) + idx.size


@both_backends
@pytest.mark.parametrize("encode, decode", CODERS)
def test_encoders_reject_bad_indices(K, encode, decode):
    enc = getattr(K, encode)
    with pytest.raises(ValueError, match=r"sorted strictly ascending: idx\[2\] = 3"):
        enc(np.array([1, 5, 3], np.uint32), 10)
    with pytest.raises(ValueError, match=r"sorted strictly ascending: idx\[1\] = 4"):
        enc(np.array([4, 4], np.uint32), 10)
    with pytest.raises(ValueError, match=r"idx\[1\] = 10 is out of range for n = 10"):
        enc(np.array([1, 10], np.uint32), 10)
    with pytest.raises(TypeError, match="uint32"):
        enc(np.array([1, 2], np.int64), 10)
    with pytest.raises(TypeError, match="dtype uint32, got >u4"):
        enc(np.array([1, 2], ">u4"), 10)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        enc([1, 2], 10)
    with pytest.raises(ValueError, match="1-D"):
        enc(np.zeros((1, 2), np.uint32), 10)
    with pytest.raises(ValueError, match="C-contiguous"):
        enc(np.arange(8, dtype=np.uint32)[::2], 10)
    with pytest.raises(ValueError, match=r"n must be in \[0, 2\*\*32\]"):
        enc(np.zeros(0, np.uint32), 2**32 + 1)
    with pytest.raises(TypeError, match="n must be an integer"):
        enc(np.zeros(0, np.uint32), 10.0)
    frozen = np.array([1, 2], np.uint32)
    frozen.flags.writeable = False
    assert np.array_equal(getattr(K, decode)(enc(frozen, 10), 10, 2), frozen)


@pytest.mark.parametrize("buf, n, k, message", [
    (b"", 10, 1, "truncated"),
    (b"\x01\x80", 10, 2, "truncated"),
    (b"\x01\x01\x01", 10, 2, "1 trailing bytes"),
    (b"\x80\x80\x80\x80\x10", 2**32, 1, "exceeds 32 bits or 5 bytes"),
    (b"\x80\x80\x80\x80\x80\x00", 2**32, 1, "exceeds 32 bits or 5 bytes"),
    (b"\x80\x00", 10, 1, "non-canonical"),
    (b"\x05\x04", 10, 2, "index 1 decodes to 10, out of range"),
    (b"\xff\xff\xff\xff\x0f", 2**32 - 1, 1, "out of range"),
])
def test_varint_decoder_rejects(buf, n, k, message):
    for module in (COMPILED, twin):
        with pytest.raises(ValueError, match=message):
            module.decode_indices(buf, n, k)


@pytest.mark.parametrize("buf, n, k, message", [
    (b"", 10, 0, "Rice parameter byte is missing"),
    (b"\x20", 10, 0, "Rice parameter 32 in byte 0 is out of range"),
    (b"\x00\x0f", 10, 5, "truncated"),
    (b"\x00\x00", 10, 1, "truncated"),
    (b"\x07\x80", 10, 1, "truncated"),
    (b"\x00\x0f\x00", 10, 4, "trailing bytes"),
    (b"\x00\x1f", 10, 4, "nonzero padding"),
    (b"\x00\x00\x01", 8, 1, "index 0 decodes to 8, out of range"),
    (b"\x1f" + b"\x00" * 64 + b"\x01" + b"\x00" * 4, 2**32, 1, "out of range"),
])
def test_rice_decoder_rejects(buf, n, k, message):
    for module in (COMPILED, twin):
        with pytest.raises(ValueError, match=message):
            module.decode_indices_rice(buf, n, k)


@pytest.mark.parametrize("buf, n, k, message", [
    (b"\x01", 10, 1, "truncated"),
    (b"\x01\x00\x00", 10, 1, "1 trailing bytes"),
    (b"\x01\x04", 10, 1, "bits set beyond n"),
    (b"\x03\x00", 10, 1, "has 2 bits set, the header says k = 1"),
])
def test_bitmap_decoder_rejects(buf, n, k, message):
    for module in (COMPILED, twin):
        with pytest.raises(ValueError, match=message):
            module.decode_indices_bitmap(buf, n, k)


@both_backends
@pytest.mark.parametrize("decode", DECODERS)
def test_decoders_check_the_header_and_buffer_type(K, decode):
    dec = getattr(K, decode)
    with pytest.raises(ValueError, match=r"k must be in \[0, n\]"):
        dec(b"\x00", 10, 11)
    with pytest.raises(ValueError, match=r"k must be in \[0, n\]"):
        dec(b"\x00", 10, -1)
    with pytest.raises(TypeError, match="bytes-like"):
        dec("abc", 10, 1)
    with pytest.raises(TypeError, match="bytes-like"):
        dec(np.zeros(2, np.int16), 10, 1)
    # a header claiming far more indices than the buffer can hold is refused before allocating
    with pytest.raises(ValueError, match="truncated"):
        dec(b"\x00\x00", 2**32, 2**31)


@both_backends
@pytest.mark.parametrize("decode", DECODERS)
def test_decoders_accept_any_contiguous_bytes_like(K, decode):
    encode = dict((d, e) for e, d in CODERS)[decode]
    idx = np.array([3, 4, 90], np.uint32)
    data = getattr(K, encode)(idx, 100)
    for buf in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert np.array_equal(getattr(K, decode)(buf, 100, 3), idx)


@pytest.mark.parametrize("decode", DECODERS)
@settings(max_examples=300, deadline=None)
@given(buf=st.binary(max_size=40), n=st.integers(0, 2**32), k=st.integers(0, 400))
def test_random_bytes_only_ever_raise_value_error(decode, buf, n, k):
    k = min(k, n)
    ours = outcome(getattr(COMPILED, decode), buf, n, k)
    theirs = outcome(getattr(twin, decode), buf, n, k)
    assert ours[0] in ("ok", "ValueError")
    if ours[0] == "ok":
        idx = ours[1]
        assert idx.dtype == np.uint32 and idx.size == k
        assert np.all(np.diff(idx.astype(np.int64)) > 0) and (k == 0 or int(idx[-1]) < n)
        assert theirs[0] == "ok" and np.array_equal(theirs[1], idx)
    else:
        assert theirs == ours


@pytest.mark.parametrize("encode, decode", CODERS)
@settings(max_examples=100, deadline=None)
@given(case=index_sets(max_n=2000), flip=st.integers(0, 10**6), cut=st.integers(0, 10**6))
def test_corrupted_buffers_are_rejected_or_valid(encode, decode, case, flip, cut):
    idx, n = case
    data = bytearray(getattr(COMPILED, encode)(idx, n))
    if data:
        data[flip % len(data)] ^= 1 << (flip % 8)
    for buf in (bytes(data), bytes(data[: cut % (len(data) + 1)]), bytes(data) + b"\x00"):
        ours = outcome(getattr(COMPILED, decode), buf, n, idx.size)
        assert ours[0] in ("ok", "ValueError")
        assert ours[0] != "ok" or np.all(np.diff(ours[1].astype(np.int64)) > 0)
        theirs = outcome(getattr(twin, decode), buf, n, idx.size)
        assert ours[0] == theirs[0]
        if ours[0] == "ok":
            assert np.array_equal(ours[1], theirs[1])
        else:
            assert ours[1] == theirs[1]


@both_backends
def test_varint_encoding_is_canonical(K):
    """Whatever the varint decoder accepts re-encodes to the same bytes."""
    rng = np.random.default_rng(7)
    idx = np.unique(rng.integers(0, 2**32, 500, dtype=np.uint64)).astype(np.uint32)
    data = K.encode_indices(idx, 2**32)
    assert K.encode_indices(K.decode_indices(data, 2**32, idx.size), 2**32) == data


# ---------------------------------------------------------------------------------------------
# value quantizers

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=120, deadline=None)
@given(vals=hnp.arrays(np.float32, st.integers(0, 100), elements=finite_float32))
def test_quantize_equals_twin_and_round_trips(kind, vals):
    ours = outcome(COMPILED.quantize, vals, kind)
    theirs = outcome(twin.quantize, vals, kind)
    assert ours[0] == theirs[0]
    if ours[0] != "ok":  # only f16 may refuse finite values: beyond half precision
        assert kind == "f16" and np.abs(vals).max() >= 65520
        assert ours[1] == theirs[1]
        return
    (data, scale), (their_data, their_scale) = ours[1], theirs[1]
    assert data == their_data and scale == their_scale
    assert isinstance(scale, float)
    back = COMPILED.dequantize(data, kind, vals.size, scale)
    assert back.dtype == np.float32 and back.shape == vals.shape
    assert np.array_equal(back.view(np.uint32), twin.dequantize(data, kind, vals.size, scale).view(np.uint32))
    if kind == "f32":
        assert np.array_equal(back.view(np.uint32), vals.view(np.uint32))
    elif kind == "f16":
        assert np.array_equal(back, vals.astype(np.float16).astype(np.float32))
        assert data == vals.astype("<f2").tobytes()
    elif kind == "int8":
        magnitude = float(np.abs(vals).max()) if vals.size else 0.0
        # max|v| / 127 rounded down to float32, so that 127 * scale never exceeds max|v|
        assert scale <= magnitude / 127 and float(np.nextafter(np.float32(scale), np.inf)) > magnitude / 127
        codes = np.frombuffer(data, np.int8)
        assert codes.min(initial=0) >= -127 and codes.max(initial=0) <= 127
        if scale:
            # half a step, plus float32 rounding of the quotient and of code * scale (each about
            # 127 * 2**-24 steps), plus (for a subnormal scale) 127 times its granularity 2**-149
            slack = 127 * 2.0**-149 if scale < np.finfo(np.float32).tiny else 0.0
            error = np.abs(back.astype(np.float64) - vals)
            assert np.all(error <= (0.5 + 2.0**-14) * scale + slack + 1e-45)
    else:
        nonzero = vals != 0
        if nonzero.any():
            assert scale == pytest.approx(float(np.abs(vals[nonzero].astype(np.float64)).mean()), rel=1e-6)
        assert np.array_equal(back[~nonzero], np.zeros(int((~nonzero).sum()), np.float32))
        assert np.all(np.abs(back[nonzero]) == np.float32(scale))
        assert np.array_equal(np.sign(back[nonzero]), np.sign(vals[nonzero]))
        assert len(data) == (vals.size + 3) // 4


@both_backends
def test_int8_rounds_half_to_even_and_clips(K):
    vals = np.array([127.0, -127.0, 0.5, 1.5, 2.5, -0.5, 0.0], np.float32)
    data, scale = K.quantize(vals, "int8")
    assert scale == 1.0
    assert list(np.frombuffer(data, np.int8)) == [127, -127, 0, 2, 2, 0, 0]


@both_backends
def test_int8_never_overflows_at_the_float32_maximum(K):
    vals = np.array([np.finfo(np.float32).max, -1.0], np.float32)
    data, scale = K.quantize(vals, "int8")
    back = K.dequantize(data, "int8", 2, scale)
    assert np.all(np.isfinite(back)) and back[0] <= vals[0]
    assert back[0] == pytest.approx(vals[0], rel=1e-6)


@both_backends
def test_ternary_known_bytes_and_negative_zero(K):
    vals = np.array([1.0, -3.0, 0.0, -0.0, 2.0], np.float32)
    data, scale = K.quantize(vals, "ternary")
    assert scale == 2.0  # mean of |1|, |-3|, |2|; the zeros (either sign) are not kept
    assert data == bytes([0b00_00_11_01, 0b01])
    assert np.array_equal(K.dequantize(data, "ternary", 5, scale), [2.0, -2.0, 0.0, 0.0, 2.0])


@both_backends
def test_all_zero_values(K):
    zeros = np.zeros(9, np.float32)
    for kind in KINDS:
        data, scale = K.quantize(zeros, kind)
        assert np.array_equal(K.dequantize(data, kind, 9, scale), zeros)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite(kind, bad):
    vals = np.ones(6, np.float32)
    vals[4] = bad
    for module in (COMPILED, twin):
        with pytest.raises(ValueError, match="non-finite value .* index 4"):
            module.quantize(vals, kind)


def test_f16_overflow_is_an_error():
    vals = np.array([1.0, 65519.0, 65520.0], np.float32)
    for module in (COMPILED, twin):
        with pytest.raises(ValueError, match=r"vals\[2\] = 65520.0 is beyond float16's range"):
            module.quantize(vals, "f16")


@both_backends
def test_quantize_argument_errors(K):
    with pytest.raises(ValueError, match="kind must be one of"):
        K.quantize(np.ones(2, np.float32), "int4")
    with pytest.raises(TypeError, match="float32"):
        K.quantize(np.ones(2), "f16")
    with pytest.raises(TypeError, match="dtype float32, got >f4"):
        K.quantize(np.ones(2, ">f4"), "f16")
    with pytest.raises(ValueError, match="C-contiguous"):
        K.quantize(np.ones(4, np.float32)[::2], "f16")
    with pytest.raises(ValueError, match="1-D"):
        K.quantize(np.ones((2, 2), np.float32), "f16")


@pytest.mark.parametrize("kind, k, size", [
    ("f32", 3, 11), ("f32", 3, 13), ("f16", 3, 5), ("int8", 3, 4), ("ternary", 5, 1), ("ternary", 4, 2),
])
def test_dequantize_checks_the_length_exactly(kind, k, size):
    for module in (COMPILED, twin):
        expected = f"buf has {size} bytes, kind '{kind}' with k = {k} needs exactly"
        with pytest.raises(ValueError, match=expected):
            module.dequantize(bytes(size), kind, k, 1.0)


@pytest.mark.parametrize("buf, kind, k, message", [
    (np.array([1.0, np.nan], "<f4").tobytes(), "f32", 2, "value 1 is not finite"),
    (np.array([np.inf], "<f2").tobytes(), "f16", 1, "value 0 is not finite"),
    (bytes([1, 0x80]), "int8", 2, "value 1 has an invalid code"),
    (bytes([0b10_01]), "ternary", 2, "value 1 has an invalid code"),
    (bytes([0b01_00_00_01]), "ternary", 3, "nonzero padding"),
])
def test_dequantize_rejects_corrupt_values(buf, kind, k, message):
    for module in (COMPILED, twin):
        with pytest.raises(ValueError, match=message):
            module.dequantize(buf, kind, k, 1.0)


@pytest.mark.parametrize("kind, scale, error", [
    ("f16", 2.0, ValueError), ("f32", 0.0, ValueError), ("int8", -1.0, ValueError),
    ("int8", np.inf, ValueError), ("ternary", np.nan, ValueError), ("ternary", 1e39, ValueError),
    ("int8", 3e36, ValueError),
    ("int8", "1", TypeError),
])
def test_dequantize_scale_errors(kind, scale, error):
    for module in (COMPILED, twin):
        with pytest.raises(error, match="scale"):
            module.dequantize(bytes(0), kind, 0, scale)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150, deadline=None)
@given(buf=st.binary(max_size=64), k=st.integers(0, 70), scale=st.floats(0, 1e3))
def test_dequantize_random_bytes(kind, buf, k, scale):
    scale = 1.0 if kind in ("f32", "f16") else scale
    ours = outcome(COMPILED.dequantize, buf, kind, k, scale)
    theirs = outcome(twin.dequantize, buf, kind, k, scale)
    assert ours[0] in ("ok", "ValueError")
    assert ours[0] == theirs[0]
    if ours[0] == "ok":
        assert ours[1].size == k and np.all(np.isfinite(ours[1]))
        assert np.array_equal(ours[1].view(np.uint32), theirs[1].view(np.uint32))
    else:
        assert ours[1] == theirs[1]


def test_f16_matches_numpy_on_every_half_and_its_neighbours():
    halves = np.arange(2**16, dtype=np.uint16)
    halves = halves[(halves & 0x7C00) != 0x7C00]  # the finite ones
    exact = halves.view(np.float16).astype(np.float32)
    back = COMPILED.dequantize(halves.astype("<u2").tobytes(), "f16", halves.size, 1.0)
    assert np.array_equal(back.view(np.uint32), exact.view(np.uint32))
    # every finite half, the float32 values next to it and the midpoints to its neighbours:
    # all the rounding cases, ties to even included
    above = np.nextafter(exact, np.float32(np.inf))
    below = np.nextafter(exact, np.float32(-np.inf))
    ordered = np.sort(exact[~((exact == 0) & np.signbit(exact))])
    mids = ((ordered[:-1].astype(np.float64) + ordered[1:]) / 2).astype(np.float32)
    vals = np.concatenate((exact, above, below, mids))
    vals = vals[np.abs(vals) < 65520]
    data, scale = COMPILED.quantize(vals, "f16")
    assert scale == 1.0
    assert data == vals.astype("<f2").tobytes()
    assert data == twin.quantize(vals, "f16")[0]
