"""The model refresh format: round trips, exact reconstruction, every malformed input refused."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.wire import (
    ModelRefresh, RefreshDecodeError, RefreshMismatch, decode_refresh, encode_refresh,
    weights_sha256,
)
from edgefl.wire.framing import checksum
from edgefl.wire.refresh import apply_refresh, build_refresh

pytestmark = pytest.mark.backend

ONNX_SHA = hashlib.sha256(b"onnx").digest()


def make(base, n, indices, values, encoding="f32", base_version=4):
    new = apply_refresh(base, indices, values)
    return ModelRefresh(base_version, base_version + 1, base_version + 1, n,
                        None if indices is None else np.asarray(indices, np.uint32),
                        np.asarray(values, np.float32), ONNX_SHA, weights_sha256(new), encoding)


def test_the_documented_vector_byte_for_byte():
    refresh = make(np.zeros(8, np.float32), 8, [1, 5], [0.5, -0.25], "f16")
    payload = encode_refresh(refresh)
    doc = (Path(__file__).parent.parent / "docs" / "wire-format.md").read_text()
    section = doc[doc.index("## Model refresh"):doc.index("## Signed message")]
    block = section[section.index("### Test vector"):].split("```")[1]
    assert bytes.fromhex(" ".join(re.findall(r"\b[0-9a-f]{2}\b", block))) == payload
    assert len(payload) == 117
    decoded = decode_refresh(payload)
    np.testing.assert_array_equal(decoded.apply(np.zeros(8, np.float32)),
                                  [0, 0.5, 0, 0, 0, -0.25, 0, 0])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.floats(0.0, 1.0), st.sampled_from(["f32", "f16", "int8", "ternary"]),
       st.integers(0, 2**31), st.booleans())
def test_a_built_refresh_rebuilds_the_servers_weights_exactly(n, density, encoding, seed, dense):
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, n).astype(np.float32)
    k = int(density * n)
    indices = None if dense else np.sort(rng.choice(n, k, replace=False)).astype(np.uint32)
    raw = rng.normal(0, 0.1, n if dense else k).astype(np.float32)
    payload, built = build_refresh(base, indices, raw, encoding, base_version=4, version=5,
                                   round_id=5, onnx_sha256=ONNX_SHA)
    decoded = decode_refresh(payload)
    assert (decoded.base_version, decoded.version, decoded.num_params) == (4, 5, n)
    assert decoded.value_encoding == encoding and decoded.weights_sha256 == built.weights_sha256
    rebuilt = decoded.apply(base)  # raises RefreshMismatch unless bit for bit the server's
    assert rebuilt.tobytes() == built.apply(base).tobytes()
    np.testing.assert_array_equal(decoded.values, built.values)


def test_a_device_on_another_model_gets_a_mismatch_not_a_wrong_model():
    base = np.arange(6, dtype=np.float32)
    refresh = decode_refresh(encode_refresh(make(base, 6, [2], [1.0])))
    other = base.copy()
    other[0] += np.float32(1e-7)  # one ulp-sized difference anywhere is caught by the hash
    with pytest.raises(RefreshMismatch, match="do not hash to the server's"):
        refresh.apply(other)
    with pytest.raises(RefreshMismatch, match="for 6 parameters"):
        refresh.apply(np.zeros(7, np.float32))


def resign(body: bytearray) -> bytes:
    return bytes(body) + checksum(bytes(body))


def test_malformed_refreshes_are_refused_with_the_reason():
    good = encode_refresh(make(np.zeros(8, np.float32), 8, [1, 5], [0.5, -0.25], "f16"))
    body = bytearray(good[:-8])
    cases = {}
    cases["truncated"] = (good[:50], "truncated")
    cases["checksum"] = (good[:-1] + bytes([good[-1] ^ 1]), "checksum mismatch")
    b = bytearray(body); b[:4] = b"EFLX"; cases["magic"] = (resign(b), "bad magic")
    b = bytearray(body); b[4] = 2; cases["version"] = (resign(b), "format version 2")
    b = bytearray(body); b[7] = 1; cases["flags"] = (resign(b), "unknown flags")
    b = bytearray(body); b[12:16] = (4).to_bytes(4, "little"); cases["backwards"] = (
        resign(b), "goes forward")
    b = bytearray(body); b[5] = 9; cases["value code"] = (resign(b), "unknown value encoding 9")
    b = bytearray(body); b[24:28] = (3).to_bytes(4, "little"); cases["k"] = (
        resign(b), "values take")
    b = bytearray(body); b[-2:] = np.array([np.inf], "<f2").tobytes(); cases["inf"] = (
        resign(b), "not finite")
    b = bytearray(body); b[-5] = 0x07; cases["index"] = (resign(b), "indices")
    cases["trailing"] = (resign(bytearray(body) + b"\0"), "do not add up")
    for name, (payload, reason) in cases.items():
        with pytest.raises(RefreshDecodeError, match=reason):
            decode_refresh(payload)
    with pytest.raises(RefreshDecodeError, match="exceeds the limit"):
        decode_refresh(good, max_bytes=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_another_exception(data):
    good = encode_refresh(make(np.zeros(8, np.float32), 8, [1, 5], [0.5, -0.25], "f16"))
    for payload in (data, good[:104] + data, resign(bytearray(good[:104] + data))):
        try:
            decode_refresh(payload)
        except RefreshDecodeError:
            pass


def test_encoding_refuses_what_the_format_cannot_say():
    ok = make(np.zeros(4, np.float32), 4, [1], [1.0])
    for change, reason in ((dict(version=4), "goes forward"), (dict(indices=np.array([2, 1])),
                            "sorted"), (dict(values=np.array([np.nan], np.float32)), "finite"),
                           (dict(value_encoding="f8"), "unknown value encoding"),
                           (dict(weights_sha256=b"x"), "32 bytes")):
        with pytest.raises(ValueError, match=reason):
            encode_refresh(ModelRefresh(**{**ok.__dict__, **change}))
