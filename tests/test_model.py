"""The model manifest, the canonical flat layout, and the device path's dependency boundary."""
import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.wire.model import ManifestError, Model, ModelManifest, TensorSpec, mlp_logits
from edgefl_server.model_builder import build_mlp

pytestmark = pytest.mark.cpu  # run again on an emulated aarch64 CPU by make test-arm64


def test_manifest_describes_the_64_32_10_head():
    model = build_mlp((64, 32, 10))
    m = model.manifest
    assert m.layer_sizes == (64, 32, 10)
    assert m.num_params == 64 * 32 + 32 + 32 * 10 + 10
    assert [t.name for t in m.tensors] == ["W1", "b1", "W2", "b2"]
    assert model.weights.dtype == np.float32 and model.weights.shape == (m.num_params,)
    assert model.version == 0 and model.sha256_matches


def test_layers_are_views_in_canonical_order():
    model = build_mlp((5, 4, 3))
    flat = model.weights.copy()
    (W1, b1), (W2, b2) = model.manifest.layers(flat)
    assert W1.shape == (5, 4) and b1.shape == (4,) and W2.shape == (4, 3) and b2.shape == (3,)
    W2[1, 2] = 123.0
    assert flat[5 * 4 + 4 + 1 * 3 + 2] == 123.0  # W row-major, right after W1 and b1
    np.testing.assert_array_equal(model.manifest.flatten([(W1, b1), (W2, b2)]), flat)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=4), st.integers(2, 12), st.booleans())
def test_manifest_bytes_round_trip(hidden, classes, with_extractor):
    sizes = hidden + [classes]
    tensors = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), 1):
        tensors += [TensorSpec(f"W{i}", (a, b)), TensorSpec(f"b{i}", (b,))]
    width = sizes[0] + 3 if with_extractor else sizes[0]
    m = ModelManifest("x", width, "out", classes, tensors, "feat" if with_extractor else "")
    assert ModelManifest.from_bytes(m.to_bytes()) == m
    assert m.num_params == sum(t.size for t in tensors)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t[:3], "pairs"),
    (lambda t: [t[0], TensorSpec("b1", (7,))] + t[2:], "expected W"),
    (lambda t: t[:2] + [TensorSpec("W2", (5, 10)), t[3]], "previous layer gives"),
    (lambda t: [t[0], t[1], t[2], TensorSpec("W1", (10,))], "unique"),
])
def test_inconsistent_manifests_are_refused(mutate, message):
    tensors = list(build_mlp((8, 6, 10)).manifest.tensors)
    with pytest.raises(ManifestError, match=message):
        ModelManifest("x", 8, "probabilities", 10, mutate(tensors))


def test_manifest_parser_rejects_garbage_with_manifest_error():
    good = build_mlp().manifest.to_bytes()
    for bad in (b"", b"NOPE" + good[4:], good[:-1], good + b"\0", good[:4] + b"\x09" + good[5:]):
        with pytest.raises(ManifestError):
            ModelManifest.from_bytes(bad)


def test_equal_manifest_bytes_are_parsed_once_and_bad_ones_fail_every_time():
    raw = build_mlp((64, 32, 10)).manifest.to_bytes()
    first = ModelManifest.from_bytes(raw)
    assert ModelManifest.from_bytes(bytearray(raw)) is first  # any bytes-like, equal content
    assert ModelManifest.from_bytes(build_mlp((64, 16, 10)).manifest.to_bytes()) != first
    bad = raw[:-1]
    for _ in range(2):  # a refusal is never remembered as a manifest
        with pytest.raises(ManifestError, match="truncated|trailing"):
            ModelManifest.from_bytes(bad)


def test_weights_are_checked_against_the_manifest():
    model = build_mlp((4, 3))
    with pytest.raises(ValueError, match="parameters"):
        model.manifest.check_weights(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="float32"):
        model.manifest.check_weights(np.zeros(model.manifest.num_params))
    bad = model.weights.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="first at 2"):
        dataclasses.replace(model, weights=bad)


def test_model_knows_when_its_bytes_do_not_match_the_hash():
    model = build_mlp((4, 3))
    tampered = dataclasses.replace(model, onnx=model.onnx + b"\0")
    assert not tampered.sha256_matches
    assert dataclasses.replace(tampered, onnx_sha256=hashlib.sha256(tampered.onnx).digest()) \
        .sha256_matches
    with pytest.raises(ValueError, match="version"):
        dataclasses.replace(model, version=-1)


def test_with_weights_keeps_the_graph_and_sets_the_version():
    model = build_mlp((4, 3))
    nxt = model.with_weights(model.weights * 2, version=3, round_id=2)
    assert (nxt.version, nxt.round_id, nxt.onnx) == (3, 2, model.onnx)
    assert isinstance(nxt, Model)


def test_mlp_logits_is_the_relu_mlp():
    model = build_mlp((6, 5, 3), seed=4)
    X = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    (W1, b1), (W2, b2) = model.manifest.layers(model.weights)
    expected = np.maximum(X @ W1 + b1, 0) @ W2 + b2
    np.testing.assert_allclose(mlp_logits(model.manifest, model.weights, X), expected, rtol=1e-6)
