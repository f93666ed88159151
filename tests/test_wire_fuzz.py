"""Fuzzing the decoders: thousands of mutated messages, and only the decode errors ever escape.

Half of the mutants get a fresh checksum, so they pass the integrity check and exercise every
validation behind it (lengths, encodings, index and value decoding).
"""
import hashlib

import numpy as np
import pytest

from edgefl.device.compression import Compressor
from edgefl.wire.protocol import CompressionConfig
from edgefl.wire import (VALUE_ENCODINGS, ModelDecodeError, Update, UpdateDecodeError,
                         decode_model, decode_update, encode_model, encode_update)
from edgefl_server.model_builder import build_mlp

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.backend, pytest.mark.cpu]

CASES_PER_MESSAGE = 1500


def seeds_of_updates():
    rng = np.random.default_rng(0)
    out = []
    for encoding in VALUE_ENCODINGS:
        for method, density, n in (("topk", 0.01, 5000), ("topk", 0.4, 300), ("none", 1.0, 40)):
            comp = Compressor(CompressionConfig(method=method, density=density, values=encoding), n)
            idx, vals = comp.sparsify(rng.normal(size=n).astype(np.float32))
            out.append(encode_update(Update("dev-1", 4, 3, 99, 10, n, idx, vals, encoding)))
    with_zeros = np.where(np.arange(64) % 3 == 0, 0.0, 1.5).astype(np.float32)  # 2-bit ternary
    out.append(encode_update(Update("dev-2", 4, 3, 9, 1, 64, None, with_zeros, "ternary")))
    return out


def mutate(rng, payload: bytes, others: list[bytes]) -> bytes:
    data = bytearray(payload)
    kind = rng.integers(5)
    if kind == 0:  # flip 1-8 bits
        for _ in range(rng.integers(1, 9)):
            pos = rng.integers(len(data))
            data[pos] ^= 1 << rng.integers(8)
    elif kind == 1:  # truncate
        data = data[: rng.integers(len(data))]
    elif kind == 2:  # splice in a piece of another message
        other = others[rng.integers(len(others))]
        a, b = sorted(rng.integers(len(other), size=2))
        at = rng.integers(len(data))
        data = data[:at] + other[a:b] + data[at + rng.integers(0, 16):]
    elif kind == 3:  # overwrite a header field with random bytes
        pos = rng.integers(min(len(data), 64))
        data[pos:pos + 4] = rng.bytes(4)
    else:  # random tail
        data = data[: rng.integers(len(data))] + rng.bytes(rng.integers(1, 64))
    if rng.random() < 0.5 and len(data) > 8:
        data = data[:-8] + hashlib.sha256(bytes(data[:-8])).digest()[:8]
    return bytes(data)


def fuzz(messages, decode, allowed, seed):
    rng = np.random.default_rng(seed)
    outcomes = {"rejected": 0, "accepted": 0}
    for payload in messages:
        for _ in range(CASES_PER_MESSAGE):
            mutant = mutate(rng, payload, messages)
            try:
                result = decode(mutant)
            except allowed:
                outcomes["rejected"] += 1
                continue
            outcomes["accepted"] += 1
            yield mutant, result
    assert outcomes["rejected"] > outcomes["accepted"]


def test_update_decoder_only_raises_update_decode_error():
    messages = seeds_of_updates()
    checked = 0
    for mutant, update in fuzz(messages, decode_update, UpdateDecodeError, seed=1):
        # Whatever decodes is a valid update: it re-encodes and decodes to the same thing.
        assert np.isfinite(update.values).all()
        if update.indices is not None:
            assert update.indices.size == update.values.size
            assert np.all(np.diff(update.indices.astype(np.int64)) > 0)
            assert update.indices.size == 0 or update.indices[-1] < update.num_params
        # f32 and f16 re-encode exactly (int8 and ternary re-derive their scale from the values);
        # a mutated header may claim billions of parameters, too many to densify here.
        if update.value_encoding in ("f32", "f16") and update.num_params <= 1 << 20:
            again = decode_update(encode_update(update))
            np.testing.assert_array_equal(again.dense(), update.dense())
        checked += 1
    assert checked > 0, "no resealed mutant decoded: the deep checks were never passed"


def test_model_decoder_only_raises_model_decode_error():
    model = build_mlp((16, 8, 4))
    messages = [encode_model(model), encode_model(build_mlp((8, 3), seed=1))]
    for mutant, decoded in fuzz(messages, decode_model, ModelDecodeError, seed=2):
        assert np.isfinite(decoded.weights).all()
        assert decoded.weights.size == decoded.manifest.num_params
