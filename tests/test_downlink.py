"""The server's compressed model refreshes: error feedback keeps the published model the sum of
the refreshes, and nothing of the strategy's steps is lost, only delayed."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl_server.downlink import DownlinkCompressor, DownlinkConfig, apply_refresh


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.sampled_from([0.01, 0.1, 0.5, 1.0]),
       st.sampled_from(["f32", "f16", "int8", "ternary"]), st.integers(0, 2**31))
def test_published_is_the_sum_of_refreshes_and_the_residual_holds_the_rest(n, density, values,
                                                                            seed):
    rng = np.random.default_rng(seed)
    compressor = DownlinkCompressor(DownlinkConfig(density=density, values=values), n)
    published = rng.normal(0, 1, n).astype(np.float32)
    device = published.copy()
    ideal = published.astype(np.float64)  # where uncompressed refreshes would have led
    for _ in range(5):
        # the strategy's new weights, computed (as on the server) from the published model
        target = (published + rng.normal(0, 0.1, n)).astype(np.float32)
        ideal += target.astype(np.float64) - published
        indices, sent, published_next = compressor.refresh(published, target)
        assert indices.size == compressor.config.k(n)
        device = apply_refresh(device, indices, sent)
        # the device that applied every refresh holds the server's model bit for bit
        assert device.tobytes() == published_next.tobytes()
        published = published_next
        # error feedback: the strategy's steps = what was published + what is held back
        np.testing.assert_allclose(published.astype(np.float64) + compressor.residual, ideal,
                                   rtol=0, atol=1e-5)


def test_dense_f32_refresh_is_the_strategy_step():
    compressor = DownlinkCompressor(DownlinkConfig(density=1.0, values="f32"), 4)
    published = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    target = np.array([1.5, 2.0, 2.0, 4.25], np.float32)
    _, _, weights = compressor.refresh(published, target)
    np.testing.assert_array_equal(weights, target)
    np.testing.assert_array_equal(compressor.residual, 0.0)


def test_a_coordinate_held_back_is_sent_once_it_has_grown():
    compressor = DownlinkCompressor(DownlinkConfig(density=0.5, values="f32"), 2)
    published = np.zeros(2, np.float32)
    # coordinate 1 moves less each step and loses to coordinate 0, until its backlog is larger
    sent_at = []
    for step in range(4):
        target = published + np.array([1.0 if step == 0 else 0.0, 0.4], np.float32)
        indices, _, published = compressor.refresh(published, target)
        sent_at.append(int(indices[0]))
    assert sent_at == [0, 1, 1, 1]  # step 2 sends the backlog 0.8 of coordinate 1
    np.testing.assert_allclose(published, [1.0, 1.6], rtol=1e-6)  # nothing lost
    np.testing.assert_array_equal(compressor.residual, 0.0)


def test_bad_config_and_foreign_residual_are_refused():
    for bad in (dict(density=0.0), dict(density=1.5), dict(values="f8"), dict(max_behind=-1)):
        with pytest.raises(ValueError):
            DownlinkConfig(**bad)
    with pytest.raises(ValueError, match="belongs to another model"):
        DownlinkCompressor(DownlinkConfig(), 10, residual=np.zeros(11, np.float32))


def test_a_non_finite_step_leaves_the_residual_unchanged():
    compressor = DownlinkCompressor(DownlinkConfig(density=0.5), 2)
    compressor.refresh(np.zeros(2, np.float32), np.array([1.0, 0.5], np.float32))
    before = compressor.residual.copy()
    with pytest.raises(ValueError):
        compressor.refresh(np.zeros(2, np.float32), np.array([np.inf, 0.0], np.float32))
    np.testing.assert_array_equal(compressor.residual, before)
