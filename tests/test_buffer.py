"""FedBuff's rules: which updates are accepted, how staleness scales them."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.wire import Update
from edgefl_server.buffer import BufferConfig, scaled_by_staleness, staleness_weight
from edgefl_server.strategies import FedAvg


def test_updates_within_the_staleness_bound_are_accepted():
    config = BufferConfig(buffer_size=3, max_staleness=2)
    assert config.too_stale(5, 5) is None and config.too_stale(3, 5) is None
    reason = config.too_stale(2, 5)
    assert reason.startswith("too stale") and "3 versions behind" in reason
    assert "newer than" in config.too_stale(6, 5)
    for bad in (dict(buffer_size=0), dict(max_staleness=-1), dict(buffer_size=True)):
        with pytest.raises(ValueError):
            BufferConfig(**bad)


@given(st.integers(0, 10_000))
def test_staleness_weight_is_the_papers_polynomial(s):
    assert staleness_weight(s) == pytest.approx(1 / math.sqrt(1 + s))
    assert staleness_weight(s + 1) < staleness_weight(s) <= 1.0


def test_fedavg_of_a_buffer_is_fedbuffs_step():
    n = 4
    deltas = [np.full(n, 1.0, np.float32), np.full(n, 2.0, np.float32), np.full(n, -3.0, np.float32)]
    bases, samples = [7, 6, 3], [10, 20, 30]
    buffer = [Update(f"d{i}", 1, b, i, s, n, None, d)
              for i, (b, s, d) in enumerate(zip(bases, samples, deltas))]
    w = np.zeros(n, np.float32)
    got = FedAvg().aggregate(w, scaled_by_staleness(buffer, current_version=7))
    want = sum(s * d / math.sqrt(1 + 7 - b) for s, d, b in zip(samples, deltas, bases)) / sum(samples)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a fresh buffer is plain FedAvg
    fresh = [u.__class__(**{**u.__dict__, "base_version": 7}) for u in buffer]
    np.testing.assert_array_equal(FedAvg().aggregate(w, scaled_by_staleness(fresh, 7)),
                                  FedAvg().aggregate(w, fresh))
