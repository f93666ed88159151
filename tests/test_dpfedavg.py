"""DP-FedAvg: clipping of each update, the fixed denominator, and the calibrated noise."""
import logging

import numpy as np
import pytest
from scipy import stats

from edgefl.wire import Update
from edgefl_server.strategies import STRATEGIES, DPFedAvg


def update(values, indices=None, samples=10):
    values = np.asarray(values, np.float32)
    n = values.size if indices is None else 8
    return Update("d", 1, 0, 1, samples, n, indices, values)


def test_without_noise_it_is_the_clipped_sum_over_the_expected_count():
    strategy = DPFedAvg(clip=1.0, noise_multiplier=0.0)
    weights = np.ones(8, np.float32)
    a = np.zeros(8, np.float32)
    a[0] = 3.0  # norm 3: clipped to 1
    b = np.full(8, 0.1, np.float32)  # norm 0.28: kept
    sparse = update([0.0, 6.0, 8.0], indices=np.array([1, 2, 3], np.uint32), samples=1000)  # norm 10
    new = strategy.aggregate(weights, [update(a), update(b, samples=1), sparse], expected_clients=4.0)
    want = b.astype(np.float64).copy()
    want[0] += 1.0
    want[2] += 0.6
    want[3] += 0.8
    np.testing.assert_allclose(new, 1.0 + want / 4.0, rtol=1e-6)  # sample counts play no part


def test_the_noise_on_the_sum_has_the_calibrated_variance():
    """An empty round releases pure noise: server_lr * N(0, (z C)^2) / (q N) per coordinate.

    With n = 200,000 coordinates, (n - 1) s^2 / sigma^2 is chi-square with n - 1 degrees of
    freedom: its two-sided p-value under the calibrated sigma must not be tiny, while a sigma
    1 % off is rejected (the relative standard error of s^2 is sqrt(2 / n) = 0.3 %)."""
    z, clip, expected, n = 1.3, 0.7, 25.0, 200_000
    strategy = DPFedAvg(clip=clip, noise_multiplier=z, noise_seed=2024)
    released = strategy.aggregate(np.zeros(n, np.float32), [], expected_clients=expected)
    x = released.astype(np.float64)
    sigma = z * clip / expected

    def p_value(s):
        statistic = (n - 1) * x.var(ddof=1) / s ** 2
        cdf = stats.chi2.cdf(statistic, n - 1)
        return 2 * min(cdf, 1 - cdf)

    assert p_value(sigma) > 1e-3
    assert p_value(1.01 * sigma) < 1e-6 and p_value(0.99 * sigma) < 1e-6
    assert abs(x.mean()) < 5 * sigma / np.sqrt(n)
    assert stats.kstest(x, "norm", args=(0.0, sigma)).pvalue > 1e-3


def test_noise_is_fresh_unless_seeded_and_a_seed_is_warned_about(caplog):
    zeros = np.zeros(1000, np.float32)
    a = DPFedAvg(clip=1.0, noise_multiplier=1.0).aggregate(zeros, [], expected_clients=1.0)
    b = DPFedAvg(clip=1.0, noise_multiplier=1.0).aggregate(zeros, [], expected_clients=1.0)
    assert not np.array_equal(a, b)
    with caplog.at_level(logging.WARNING):
        c = DPFedAvg(clip=1.0, noise_multiplier=1.0, noise_seed=5).aggregate(zeros, [])
    assert "for simulations only" in caplog.text
    d = DPFedAvg(clip=1.0, noise_multiplier=1.0, noise_seed=5).aggregate(zeros, [])
    np.testing.assert_array_equal(c, d)


def test_not_chosen_by_name_and_its_options_are_checked():
    assert "dpfedavg" not in STRATEGIES  # only with central DP's sampling and accounting
    # An empty round still releases noise (a kept model would say that nobody answered).
    released = DPFedAvg(noise_multiplier=1.0).aggregate_round(np.zeros(4, np.float32), [],
                                                              expected_clients=2.0)
    assert released is not None and np.all(released != 0)
    with pytest.raises(ValueError, match="clip"):
        DPFedAvg(clip=0.0)
    with pytest.raises(ValueError, match="expected_clients"):
        DPFedAvg().aggregate(np.zeros(3, np.float32), [], expected_clients=0.0)
