"""The server's compressed model refreshes: the published model is exactly what a device rebuilds
from the refreshes, and error feedback loses nothing of the strategy's steps, only delays it."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.wire import decode_refresh, weights_sha256
from edgefl_server.downlink import DownlinkCompressor, DownlinkConfig
from edgefl_server.model_builder import build_mlp

pytestmark = pytest.mark.backend


@functools.lru_cache(maxsize=None)
def model_of(width: int, classes: int):
    return build_mlp((width, classes), seed=width)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(2, 5), st.sampled_from([0.01, 0.1, 0.5, 1.0]),
       st.sampled_from(["f32", "f16", "int8", "ternary"]), st.integers(0, 2**31))
def test_devices_rebuild_the_published_model_and_the_residual_holds_the_rest(
        width, classes, density, values, seed):
    rng = np.random.default_rng(seed)
    model = model_of(width, classes)
    n = model.manifest.num_params
    compressor = DownlinkCompressor(DownlinkConfig(density=density, values=values), n)
    device = model.weights.copy()
    ideal = model.weights.astype(np.float64)  # where uncompressed refreshes would have led
    for round_id in range(1, 6):
        # the strategy's new weights, computed (as on the server) from the published model
        target = (model.weights + rng.normal(0, 0.1, n)).astype(np.float32)
        ideal += target.astype(np.float64) - model.weights
        payload, new = compressor.refresh(model, target, round_id=round_id)
        refresh = decode_refresh(payload)
        assert (refresh.base_version, refresh.version) == (model.version, model.version + 1)
        assert refresh.k == compressor.config.k(n) and refresh.onnx_sha256 == model.onnx_sha256
        device = refresh.apply(device)  # checks the hash: raises on any difference
        assert device.tobytes() == new.weights.tobytes()
        assert weights_sha256(new.weights) == refresh.weights_sha256
        model = new
        # error feedback: the strategy's steps = what was published + what is held back
        np.testing.assert_allclose(model.weights.astype(np.float64) + compressor.residual, ideal,
                                   rtol=0, atol=1e-5)


def test_dense_f32_refresh_is_the_strategy_step():
    model = build_mlp((1, 2), seed=0)  # 4 parameters
    compressor = DownlinkCompressor(DownlinkConfig(density=1.0, values="f32"), 4)
    target = (model.weights + np.array([0.5, 0.0, -1.0, 0.25], np.float32)).astype(np.float32)
    _, new = compressor.refresh(model, target, round_id=1)
    np.testing.assert_array_equal(new.weights, target)
    np.testing.assert_array_equal(compressor.residual, 0.0)
    assert (new.version, new.round_id, new.onnx) == (1, 1, model.onnx)


def test_a_coordinate_held_back_is_sent_once_it_has_grown():
    model = build_mlp((1, 2), seed=0)
    model = model.with_weights(np.zeros(4, np.float32), version=0, round_id=0)
    compressor = DownlinkCompressor(DownlinkConfig(density=0.25, values="f32"), 4)
    sent_at = []
    for step in range(4):
        target = model.weights + np.array([1.0 if step == 0 else 0.0, 0.4, 0, 0], np.float32)
        payload, model = compressor.refresh(model, target, round_id=step + 1)
        sent_at.append(int(decode_refresh(payload).indices[0]))
    assert sent_at == [0, 1, 1, 1]  # step 2 sends the backlog 0.8 of coordinate 1
    np.testing.assert_allclose(model.weights, [1.0, 1.6, 0, 0], rtol=1e-6)  # nothing lost
    np.testing.assert_array_equal(compressor.residual, 0.0)


def test_bad_config_and_foreign_residual_are_refused():
    for bad in (dict(density=0.0), dict(density=1.5), dict(values="f8"), dict(max_behind=-1)):
        with pytest.raises(ValueError):
            DownlinkConfig(**bad)
    with pytest.raises(ValueError, match="belongs to another model"):
        DownlinkCompressor(DownlinkConfig(), 10, residual=np.zeros(11, np.float32))


def test_a_non_finite_step_leaves_the_residual_unchanged():
    model = build_mlp((1, 2), seed=0)
    compressor = DownlinkCompressor(DownlinkConfig(density=0.5), 4)
    compressor.refresh(model, model.weights + 1.0, round_id=1)
    before = compressor.residual.copy()
    with pytest.raises(ValueError):
        compressor.refresh(model, np.full(4, np.inf, np.float32), round_id=2)
    np.testing.assert_array_equal(compressor.residual, before)
