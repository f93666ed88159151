"""The wire format: round trips for every encoding, and every decoding error by name."""
import dataclasses
import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl import kernels
from edgefl.device.compression import Compressor
from edgefl.device.predictor import ModelRejected, Predictor
from edgefl.wire.protocol import CompressionConfig
from edgefl.wire import (INDEX_CODINGS, VALUE_ENCODINGS, WIRE_VALUE_CODES, ModelDecodeError,
                         Update, UpdateDecodeError, decode_model, decode_update, encode_model,
                         encode_update)
from edgefl_server.model_builder import build_mlp

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.backend, pytest.mark.cpu]

HEADER = struct.Struct("<4sBBBBIIQIIIfII")  # as docs/wire-format.md specifies it


def reseal(body: bytes) -> bytes:
    """A message with a valid checksum over ``body`` (to reach the checks behind it)."""
    return body + hashlib.sha256(body).digest()[:8]


def raw_update(*, magic=b"EFLU", version=1, enc=0, coding=0, client=b"dev", round_id=1,
               base=1, update_id=1, samples=1, params=4, k=None, scale=1.0, index=b"",
               values=None):
    """Build an update by hand from the spec, independently of the encoder."""
    values = np.zeros(params, "<f4").tobytes() if values is None else values
    k = params if k is None else k
    header = HEADER.pack(magic, version, enc, coding, len(client), round_id, base, update_id,
                         samples, params, k, scale, len(index), len(values))
    return reseal(header + client + index + values)


def sample_update(n=1000, k=30, encoding="f32", seed=0, dense=False):
    rng = np.random.default_rng(seed)
    comp = Compressor(CompressionConfig(method="none" if dense else "topk", density=k / n,
                                        values=encoding), n)
    idx, vals = comp.sparsify(rng.normal(size=n).astype(np.float32))
    return Update("device-7", 3, 2, 2**64 - 1, 120, n, idx, vals, encoding)


def assert_same(decoded: Update, update: Update):
    for field in ("client_id", "round_id", "base_version", "update_id", "num_samples",
                  "num_params", "value_encoding"):
        assert getattr(decoded, field) == getattr(update, field), field
    if update.indices is None:
        assert decoded.indices is None
    else:
        np.testing.assert_array_equal(decoded.indices, update.indices)
        assert decoded.indices.dtype == np.uint32


# -- round trips --------------------------------------------------------------------------------

@st.composite
def updates(draw):
    n = draw(st.integers(1, 3000))
    dense = draw(st.booleans())
    if dense:
        idx = None
        k = n
    else:
        k = draw(st.integers(0, min(n, 400)))
        idx = np.sort(np.random.default_rng(draw(st.integers(0, 2**32))).choice(
            n, size=k, replace=False)).astype(np.uint32)
    encoding = draw(st.sampled_from(VALUE_ENCODINGS))
    magnitude = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]))
    vals = (np.random.default_rng(draw(st.integers(0, 2**32))).normal(size=k) * magnitude)
    limit = 6e4 if encoding == "f16" else 1e37  # f16 tops out at 65504
    vals = np.clip(vals, -limit, limit).astype(np.float32)
    return Update(draw(st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)),
                  draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                  draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**32 - 1)), n, idx,
                  vals, encoding)


@settings(max_examples=150, deadline=None)
@given(updates())
def test_every_encoding_round_trips(update):
    decoded = decode_update(encode_update(update), expected_params=update.num_params)
    assert_same(decoded, update)
    assert decoded.values.dtype == np.float32 and decoded.values.shape == update.values.shape
    x = update.values
    if update.value_encoding == "f32":
        np.testing.assert_array_equal(decoded.values, x)
    elif update.value_encoding == "f16":
        np.testing.assert_array_equal(decoded.values, x.astype(np.float16).astype(np.float32))
    elif update.value_encoding == "int8" and x.size:
        np.testing.assert_allclose(decoded.values, x, rtol=0,
                                   atol=float(np.abs(x).max()) / 127 * 0.51)
    elif x.size:  # ternary: the sign and one magnitude
        nonzero = decoded.values != 0
        assert len(np.unique(np.abs(decoded.values[nonzero]))) <= 1
        assert np.all(np.sign(decoded.values[nonzero]) == np.sign(x[nonzero]))
    again = decode_update(encode_update(decoded))  # what was decoded re-encodes to itself
    np.testing.assert_allclose(again.values, decoded.values, rtol=1e-6, atol=0)


@pytest.mark.parametrize("encoding", VALUE_ENCODINGS)
def test_compressor_output_round_trips_exactly(encoding):
    update = sample_update(encoding=encoding)
    decoded = decode_update(encode_update(update))
    assert_same(decoded, update)
    np.testing.assert_allclose(decoded.values, update.values, rtol=1e-6, atol=0)
    np.testing.assert_allclose(decoded.dense(), update.dense(), rtol=1e-6, atol=0)


def test_ternary_without_zeros_travels_as_sign_bits():
    update = sample_update(n=100_000, k=1000, encoding="ternary")
    payload = encode_update(update)
    assert payload[5] == WIRE_VALUE_CODES.index("signs")
    assert HEADER.unpack_from(payload)[13] == 125  # 1000 values, one bit each
    decoded = decode_update(payload)
    assert decoded.value_encoding == "ternary"
    buf, scale = kernels.quantize(update.values, "ternary")
    np.testing.assert_array_equal(decoded.values, kernels.dequantize(buf, "ternary", 1000, scale))
    with_zero = dataclasses.replace(update, values=np.where(np.arange(1000) == 5, 0,
                                                            update.values).astype(np.float32))
    payload = encode_update(with_zero)
    assert payload[5] == VALUE_ENCODINGS.index("ternary")
    assert decode_update(payload).values[5] == 0.0


def test_sign_bits_padding_and_length_are_checked():
    signs = WIRE_VALUE_CODES.index("signs")
    good = raw_update(enc=signs, params=4, values=b"\x05")
    np.testing.assert_array_equal(decode_update(good).values, [-1, 1, -1, 1])
    with pytest.raises(UpdateDecodeError, match="padding"):
        decode_update(raw_update(enc=signs, params=4, values=b"\x15"))
    with pytest.raises(UpdateDecodeError, match="take 1 bytes"):
        decode_update(raw_update(enc=signs, params=4, values=b"\x05\x00"))


def _coding_of(payload: bytes) -> str:
    return INDEX_CODINGS[payload[6]]


@pytest.mark.parametrize("indices, n, best", [
    (np.arange(0, 1000, 2), 1000, "bitmap"),  # half of all coordinates
    (np.sort(np.random.default_rng(0).choice(100_000, 1000, replace=False)), 100_000, None),
    (np.array([5, 6, 7, 90_000]), 100_000, None),
])
def test_encoder_picks_the_smallest_index_coding(indices, n, best):
    indices = indices.astype(np.uint32)
    update = Update("d", 1, 1, 1, 1, n, indices, np.ones(len(indices), np.float32))
    payload = encode_update(update)
    sizes = {"varint": len(kernels.encode_indices(indices, n)),
             "rice": len(kernels.encode_indices_rice(indices, n)),
             "bitmap": len(kernels.encode_indices_bitmap(indices, n))}
    assert sizes[_coding_of(payload)] == min(sizes.values())
    if best:
        assert _coding_of(payload) == best
    np.testing.assert_array_equal(decode_update(payload).indices, indices)


def test_dense_and_empty_updates():
    dense = sample_update(n=50, dense=True)
    payload = encode_update(dense)
    assert _coding_of(payload) == "dense"
    np.testing.assert_array_equal(decode_update(payload).values, dense.values)
    empty = Update("d", 1, 1, 1, 0, 10, np.zeros(0, np.uint32), np.zeros(0, np.float32), "int8")
    decoded = decode_update(encode_update(empty))
    assert decoded.k == 0 and decoded.indices.size == 0


def test_the_header_is_laid_out_as_documented():
    update = sample_update(n=1000, k=10, encoding="f16")
    payload = encode_update(update)
    fields = HEADER.unpack_from(payload)
    assert fields[:2] == (b"EFLU", 1) and fields[2] == VALUE_ENCODINGS.index("f16")
    assert fields[4:12] == (8, 3, 2, 2**64 - 1, 120, 1000, 10, 1.0)
    index_len, value_len = fields[12], fields[13]
    assert value_len == 20
    assert len(payload) == HEADER.size + 8 + index_len + value_len + 8
    assert payload[HEADER.size:HEADER.size + 8] == b"device-7"
    assert payload[-8:] == hashlib.sha256(payload[:-8]).digest()[:8]
    assert decode_update(raw_update(values=np.arange(4, dtype="<f4").tobytes())).values.tolist() \
        == [0.0, 1.0, 2.0, 3.0]


# -- refusing bad updates -----------------------------------------------------------------------

def f32(*values):
    return np.array(values, "<f4").tobytes()


@pytest.mark.parametrize("payload, message", [
    (b"", "truncated"),
    (raw_update()[:40], "truncated"),
    (raw_update(magic=b"EFLM"), "bad magic"),
    (raw_update(version=2), "version 2 is not supported"),
    (raw_update()[:-1] + b"\0", "checksum mismatch"),
    (raw_update(enc=7), "unknown value encoding"),
    (raw_update(enc=5), "unknown value encoding"),
    (raw_update(coding=9), "unknown index coding"),
    (raw_update(params=0, values=b""), "num_params"),
    (raw_update(k=3), "inconsistent"),
    (raw_update(values=f32(0, 0, 0)), "take 16 bytes"),
    (raw_update(client=b"a/b"), "client id"),
    (raw_update(client=b""), "client id"),
    (raw_update(values=f32(0, np.nan, 0, 0)), "f32 values: .*value 1 is not finite"),
    (raw_update(values=f32(0, 0, np.inf, 0)), "f32 values: .*value 2 is not finite"),
    (raw_update(enc=1, values=np.array([0, np.inf, 0, 0], "<f2").tobytes()),
     "f16 values: .*value 1 is not finite"),
    (raw_update(enc=2, values=b"\1\2\3\4", scale=float("nan")), "scale"),
    (raw_update(enc=2, values=b"\1\2\3\4", scale=-1.0), "scale"),
    (raw_update(enc=2, values=b"\1\2\3\x7f", scale=3e38), "overflows"),
    (raw_update(index=b"\0"), "no index bytes"),
    (reseal(raw_update()[:-9]), "lengths do not add up"),
])
def test_malformed_updates_are_refused_by_name(payload, message):
    with pytest.raises(UpdateDecodeError, match=message):
        decode_update(payload)


@pytest.mark.parametrize("coding", ["varint", "rice", "bitmap"])
def test_indices_out_of_range_are_refused(coding):
    encode = {"varint": kernels.encode_indices, "rice": kernels.encode_indices_rice,
              "bitmap": kernels.encode_indices_bitmap}[coding]
    blob = bytes(encode(np.array([1, 3, 900], np.uint32), 1000))
    payload = raw_update(coding=INDEX_CODINGS.index(coding), params=500, k=3, index=blob,
                         values=f32(1, 2, 3))
    with pytest.raises(UpdateDecodeError, match=coding):
        decode_update(payload)


def test_index_count_and_trailing_bytes_are_checked():
    # Gap-1 coding cannot express an unsorted or repeated index at all (the encoder refuses them,
    # below); what a corrupt message can do is carry fewer or more coded indices than k says.
    blob = bytes(kernels.encode_indices(np.array([4, 9], np.uint32), 100))
    with pytest.raises(UpdateDecodeError, match="varint"):
        decode_update(raw_update(coding=1, params=100, k=3, index=blob, values=f32(1, 2, 3)))
    with pytest.raises(UpdateDecodeError, match="varint"):
        decode_update(raw_update(coding=1, params=100, k=1, index=blob, values=f32(1)))
    bitmap = bytes(kernels.encode_indices_bitmap(np.array([4, 9], np.uint32), 100))
    with pytest.raises(UpdateDecodeError, match="bitmap"):
        decode_update(raw_update(coding=3, params=100, k=3, index=bitmap, values=f32(1, 2, 3)))


def test_shape_mismatch_and_size_limit():
    payload = encode_update(sample_update(n=1000))
    with pytest.raises(UpdateDecodeError, match="shape mismatch: the update has 1000"):
        decode_update(payload, expected_params=999)
    with pytest.raises(UpdateDecodeError, match="exceeds the limit"):
        decode_update(payload, max_bytes=len(payload) - 1)
    assert decode_update(bytearray(payload)).num_params == 1000
    assert decode_update(memoryview(payload)).num_params == 1000


@pytest.mark.parametrize("change, message", [
    ({"client_id": "no/slash"}, "client id"),
    ({"round_id": -1}, "round_id"),
    ({"update_id": 2**64}, "update_id"),
    ({"value_encoding": "f64"}, "value encoding"),
    ({"indices": np.array([3, 2, 5], np.uint32), "values": np.ones(3, np.float32)}, "sorted"),
    ({"indices": np.array([3, 3], np.uint32), "values": np.ones(2, np.float32)}, "distinct"),
    ({"indices": np.array([1000], np.uint32), "values": np.ones(1, np.float32)}, "sorted"),
    ({"values": np.full(30, np.nan, np.float32)}, "finite"),
    ({"indices": None}, "dense"),
    ({"value_encoding": "f16", "values": np.full(30, 7e4, np.float32)}, "does not fit f16"),
])
def test_encoder_refuses_invalid_updates(change, message):
    with pytest.raises(ValueError, match=message):
        encode_update(dataclasses.replace(sample_update(n=1000, k=30), **change))


# -- the model envelope -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return dataclasses.replace(build_mlp((64, 32, 10), seed=3), version=7, round_id=6,
                               signature=b"\x01" * 64)


def test_model_envelope_round_trips(model):
    decoded = decode_model(encode_model(model))
    assert (decoded.version, decoded.round_id, decoded.signature) == (7, 6, b"\x01" * 64)
    assert decoded.manifest == model.manifest and decoded.onnx == model.onnx
    assert decoded.onnx_sha256 == model.onnx_sha256
    np.testing.assert_array_equal(decoded.weights, model.weights)
    assert decoded.weights.flags.writeable and decoded.weights.dtype == np.float32
    Predictor(decoded)  # the device runs it as it arrived


def test_a_model_with_a_wrong_hash_decodes_but_the_device_refuses_it(model):
    tampered = dataclasses.replace(model, onnx=model.onnx[:-1] + b"\x00")
    decoded = decode_model(encode_model(tampered))
    with pytest.raises(ModelRejected, match="SHA-256"):
        Predictor(decoded)


def _model_body(model):
    return encode_model(model)[:-8]


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:30], "truncated"),
    (lambda b: reseal(b"EFLU" + b[4:]), "bad magic"),
    (lambda b: reseal(b[:4] + b"\x02" + b[5:]), "version 2"),
    (lambda b: b + b"\0" * 8, "checksum mismatch"),
    (lambda b: reseal(b[:5] + b"\x01" + b[6:]), "unknown flags"),
    (lambda b: reseal(b[:-1]), "lengths do not add up"),
    (lambda b: reseal(b[:20] + struct.pack("<I", 5) + b[24:]), "lengths do not add up"),
    (lambda b: reseal(b[:60] + b"XXXX" + b[64:]), "manifest: bad magic"),
])
def test_malformed_model_envelopes_are_refused_by_name(model, mutate, message):
    with pytest.raises(ModelDecodeError, match=message):
        decode_model(mutate(_model_body(model)))


def test_model_with_nan_weights_or_too_large_is_refused(model):
    body = bytearray(_model_body(model))
    manifest_len = struct.unpack_from("<I", body, 16)[0]
    struct.pack_into("<f", body, 60 + manifest_len + 8, float("nan"))
    with pytest.raises(ModelDecodeError, match="NaN/Inf"):
        decode_model(reseal(bytes(body)))
    payload = encode_model(model)
    with pytest.raises(ModelDecodeError, match="exceeds the limit"):
        decode_model(payload, max_bytes=len(payload) - 1)
    assert issubclass(ModelDecodeError, ValueError) and issubclass(UpdateDecodeError, ValueError)


@pytest.mark.parametrize("update, hex_bytes", [
    (Update("dev", 2, 1, 7, 10, 1000, np.array([3, 10, 700], np.uint32),
            np.array([0.5, -0.25, 2.0], np.float32), "f16"),
     "45464c5501010103020000000100000007000000000000000a000000e8030000030000000000803f04000000"
     "060000006465760306b105003800b40040004cf82550fcdbe2"),
    (Update("dev", 1, 1, 7, 10, 8, np.array([1, 5], np.uint32),
            np.array([0.5, -0.25], np.float32), "ternary"),
     "45464c5501040303010000000100000007000000000000000a00000008000000020000000000c03e01000000"
     "010000006465762202e0d4fb6fd0d6a772"),
])
def test_documented_test_vectors(update, hex_bytes):
    """The two messages spelled out in docs/wire-format.md, byte for byte, both ways."""
    assert encode_update(update).hex() == hex_bytes
    decoded = decode_update(bytes.fromhex(hex_bytes))
    assert_same(decoded, update)
    np.testing.assert_array_equal(decoded.values, update.values if update.value_encoding == "f16"
                                  else [0.375, -0.375])
