"""Privacy: calibration, the budget and its persistence, and the pipeline's ordering rule."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from edgefl import kernels
from edgefl.device.compression import Compressor
from edgefl.device.privacy import PrivacyAccountant, PrivacyBudgetExhausted, PrivacyPolicy
from edgefl.wire.protocol import CompressionConfig, PrivacyConfig
from edgefl.device.secure_noise import (ChaChaUniforms, discrete_laplace, discrete_laplace_pmf,
                                        grid_for, to_grid)
from edgefl.device.update_pipeline import UpdatePipeline
from edgefl.wire.calibration import (analytic_gaussian_delta, analytic_gaussian_sigma,
                                     classic_gaussian_sigma)

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.backend, pytest.mark.cpu]


def laplace(epsilon=1.0, clip=1.0):
    return PrivacyConfig(mechanism="laplace", epsilon=epsilon, clip=clip)


def gaussian(epsilon=0.5, delta=1e-5, clip=1.0):
    return PrivacyConfig(mechanism="gaussian", epsilon=epsilon, delta=delta, clip=clip)


def pipeline(privacy, compression=CompressionConfig(), *, n=1000, budget=100.0, path=None,
             delta_budget=1e-5):
    accountant = PrivacyAccountant(budget, delta_budget=delta_budget, path=path)
    return UpdatePipeline(PrivacyPolicy(privacy, accountant), Compressor(compression, n))


# -- calibration --------------------------------------------------------------------------------

def test_local_noise_is_calibrated_to_the_replace_one_sensitivity_2c():
    assert PrivacyPolicy(laplace(epsilon=0.5, clip=2.0), PrivacyAccountant(1.0)).scale == 8.0
    sigma = PrivacyPolicy(gaussian(epsilon=0.5, delta=1e-5, clip=2.0), PrivacyAccountant(1.0)).scale
    assert sigma == pytest.approx(analytic_gaussian_sigma(4.0, 0.5, 1e-5), rel=1e-12)


@pytest.mark.parametrize("epsilon, delta", [(0.1, 1e-5), (0.5, 1e-6), (0.9, 1e-3)])
def test_analytic_gaussian_is_tight_and_below_the_classic_bound(epsilon, delta):
    sigma = analytic_gaussian_sigma(1.0, epsilon, delta)
    assert analytic_gaussian_delta(sigma, 1.0, epsilon) <= delta
    assert analytic_gaussian_delta(sigma * 0.999, 1.0, epsilon) > delta  # the smallest that works
    assert sigma < classic_gaussian_sigma(1.0, epsilon, delta)


def test_analytic_gaussian_covers_epsilon_above_one_and_scales_with_clip():
    s1 = analytic_gaussian_sigma(1.0, 4.0, 1e-5)
    assert analytic_gaussian_delta(s1, 1.0, 4.0) <= 1e-5
    assert analytic_gaussian_sigma(3.0, 4.0, 1e-5) == pytest.approx(3 * s1, rel=1e-9)


@pytest.mark.parametrize("config, message", [
    (PrivacyConfig(mechanism="laplace", epsilon=0.0), "epsilon"),
    (PrivacyConfig(mechanism="laplace", clip=-1.0), "clip"),
    (PrivacyConfig(mechanism="gaussian", delta=0.0), "delta"),
    (PrivacyConfig(mechanism="renyi"), "unknown privacy mechanism"),
])
def test_bad_privacy_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        PrivacyPolicy(config, PrivacyAccountant(1.0))


def test_clipping_uses_the_mechanisms_norm():
    x = np.full(100, 0.1, np.float32)  # L1 10, L2 1
    lap = PrivacyPolicy(laplace(clip=2.0), PrivacyAccountant(1.0))
    y = x.copy()
    assert lap.clip_(y) == pytest.approx(10.0, rel=1e-6)
    assert np.abs(y).sum() == pytest.approx(2.0, rel=1e-5)
    gau = PrivacyPolicy(gaussian(clip=0.5), PrivacyAccountant(1.0))
    y = x.copy()
    assert gau.clip_(y) == pytest.approx(1.0, rel=1e-6)
    assert np.linalg.norm(y) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("privacy, dist", [
    (laplace(epsilon=0.5, clip=1.0), "laplace"),
    (gaussian(epsilon=0.8, delta=1e-5, clip=1.0), "norm"),
])
def test_noise_on_a_zero_update_matches_the_policy(privacy, dist):
    """Released values of an all-zero delta are pure noise of exactly the policy's scale."""
    n = 100_000
    pipe = pipeline(privacy, n=n)
    _, values = pipe.run(np.zeros(n, np.float32), rng=np.random.default_rng(11))
    scale = pipe.policy.scale
    assert stats.kstest(values, dist, args=(0.0, scale)).pvalue > 1e-3
    expected_std = scale * math.sqrt(2) if dist == "laplace" else scale
    assert np.std(values) == pytest.approx(expected_std, rel=0.02)


# -- the budget ---------------------------------------------------------------------------------

def test_budget_exhaustion_stops_updates_before_any_work():
    pipe = pipeline(laplace(epsilon=0.4), CompressionConfig(method="topk", density=0.1),
                    budget=1.0)
    delta = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    rng = np.random.default_rng(1)
    pipe.run(delta, rng=rng)
    pipe.run(delta, rng=rng)
    residual = pipe.compressor.residual.copy()
    state = rng.bit_generator.state
    with pytest.raises(PrivacyBudgetExhausted) as err:
        pipe.run(delta, rng=rng)
    message = str(err.value)
    assert "0.8" in message and "budget 1" in message and "0.4" in message
    np.testing.assert_array_equal(pipe.compressor.residual, residual)  # no work was done
    assert rng.bit_generator.state == state
    assert pipe.policy.accountant.updates == 2
    assert isinstance(err.value, RuntimeError)


def test_each_update_is_charged_once_and_no_privacy_costs_nothing():
    pipe = pipeline(gaussian(epsilon=0.25, delta=1e-6), budget=10.0, delta_budget=1e-5)
    for _ in range(3):
        pipe.run(np.ones(1000, np.float32), rng=np.random.default_rng(0))
    acc = pipe.policy.accountant
    assert acc.spent_epsilon == pytest.approx(0.75) and acc.spent_delta == pytest.approx(3e-6)
    assert acc.remaining == pytest.approx(9.25)
    free = UpdatePipeline(PrivacyPolicy(PrivacyConfig(), None), Compressor(CompressionConfig(), 10))
    free.run(np.ones(10, np.float32), rng=np.random.default_rng(0))
    assert free.policy.epsilon == 0.0


def test_spent_budget_survives_a_reboot(tmp_path):
    path = tmp_path / "privacy.json"
    acc = PrivacyAccountant(1.0, path=path)
    acc.charge(0.6)
    rebooted = PrivacyAccountant(1.0, path=path)
    assert rebooted.spent_epsilon == pytest.approx(0.6) and rebooted.updates == 1
    with pytest.raises(PrivacyBudgetExhausted, match="spent epsilon 0.6 of the budget 1"):
        rebooted.charge(0.6)
    assert PrivacyAccountant(1.0, path=path).spent_epsilon == pytest.approx(0.6)
    assert [p.name for p in tmp_path.iterdir()] == ["privacy.json"]  # no temporary left over


def test_an_unreadable_budget_file_is_never_reset(tmp_path):
    path = tmp_path / "privacy.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="must not be reset silently"):
        PrivacyAccountant(1.0, path=path)


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="budget"):
        PrivacyAccountant(0.0)
    with pytest.raises(ValueError, match="PrivacyAccountant"):
        PrivacyPolicy(laplace(), None)


# -- the ordering rule --------------------------------------------------------------------------

def test_dp_topk_selects_from_the_noised_dense_update():
    n, seed = 2000, 5
    delta = np.random.default_rng(0).normal(size=n).astype(np.float32)
    pipe = pipeline(laplace(epsilon=2.0, clip=3.0), CompressionConfig(method="topk", density=0.05),
                    n=n)
    idx, values = pipe.run(delta, rng=np.random.default_rng(seed))
    # The same steps by hand: clip the dense vector, noise all of it, then top-k.
    x = delta.copy()
    kernels.clip_l1_(x, 3.0)
    kernels.laplace_(x, 3.0, np.random.default_rng(seed))  # 2C / epsilon
    want_idx, want_vals = kernels.topk(x, 100)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(values, want_vals)
    clean_idx, _ = kernels.topk(delta, 100)
    assert not np.array_equal(idx, clean_idx)  # selection did not see the clean update


def test_dp_randomk_picks_indices_independent_of_the_data_and_noises_only_those():
    n, seed = 5000, 123
    config = CompressionConfig(method="randomk", density=0.02)
    a = np.random.default_rng(0).normal(size=n).astype(np.float32)
    b = np.zeros(n, np.float32)
    b[7] = 1e6
    idx_a, vals_a = pipeline(laplace(clip=2.0), config, n=n).run(
        a, rng=np.random.default_rng(1), randomk_seed=seed)
    idx_b, _ = pipeline(laplace(clip=2.0), config, n=n).run(
        b, rng=np.random.default_rng(1), randomk_seed=seed)
    np.testing.assert_array_equal(idx_a, idx_b)
    np.testing.assert_array_equal(idx_a, kernels.randomk(n, 100, seed))
    kept = a[idx_a].copy()  # clip the k kept values to the same bound, noise only them
    kernels.clip_l1_(kept, 2.0)
    kernels.laplace_(kept, 4.0, np.random.default_rng(1))
    np.testing.assert_array_equal(vals_a, kept)


def test_without_dp_topk_runs_on_the_clean_update():
    delta = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    pipe = UpdatePipeline(PrivacyPolicy(PrivacyConfig(), None),
                          Compressor(CompressionConfig(method="topk", density=0.01), 1000))
    idx, values = pipe.run(delta, rng=np.random.default_rng(0))
    want_idx, want_vals = kernels.topk(delta, 10)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(values, want_vals)


def test_the_delta_is_never_modified_and_non_finite_deltas_are_refused():
    delta = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    original = delta.copy()
    pipe = pipeline(laplace())
    pipe.run(delta, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(delta, original)
    delta[3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        pipe.run(delta, rng=np.random.default_rng(0))
    assert pipe.policy.accountant.updates == 1


@pytest.mark.parametrize("method", ["topk", "threshold"])
def test_clean_residual_from_a_round_without_privacy_never_reaches_a_private_update(method):
    """Error feedback of a privacy-off round holds clean values; a DP round must not send them."""
    n = 100
    compressor = Compressor(CompressionConfig(method, density=0.01, tau=50.0), n)
    clean = np.arange(1, n + 1, dtype=np.float32)  # a delta whose magnitudes say a lot
    UpdatePipeline(PrivacyPolicy(PrivacyConfig("none"), None), compressor).run(
        clean, rng=np.random.default_rng(0))
    assert compressor.residual.any()  # clean values were held back

    private = PrivacyPolicy(PrivacyConfig("laplace", epsilon=1.0, clip=1.0),
                            PrivacyAccountant(10.0))
    indices, values = UpdatePipeline(private, compressor).run(
        np.zeros(n, np.float32), rng=np.random.default_rng(1))
    # Laplace(0, 2) noise on a zero delta: nothing near the clean magnitudes (up to 50 or 99)
    # is sent or kept for later.
    assert values.size == 0 or np.abs(values).max() < 25
    assert np.abs(compressor.residual).max() < 25
    assert compressor.residual_is_private


def test_the_delta_of_gaussian_rounds_is_budgeted():
    pipe = pipeline(gaussian(epsilon=0.1, delta=4e-6), budget=100.0, delta_budget=1e-5)
    for _ in range(2):
        pipe.run(np.ones(1000, np.float32), rng=np.random.default_rng(0))
    with pytest.raises(PrivacyBudgetExhausted, match="delta 8e-06 of 1e-05"):
        pipe.run(np.ones(1000, np.float32), rng=np.random.default_rng(0))
    assert pipe.policy.accountant.updates == 2


def test_the_budget_file_says_what_its_epsilon_means(tmp_path):
    path = tmp_path / "privacy.json"
    PrivacyAccountant(4.0, path=path).charge(0.5)
    state = json.loads(path.read_text())
    assert state["adjacency"] == "replace-one" and state["composition"] == "basic"
    assert state["spent_epsilon"] == 0.5 and state["delta_budget"] == 1e-5


def test_a_budget_file_from_before_replace_one_is_charged_at_group_privacy_of_two(tmp_path):
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps({"spent_epsilon": 1.5, "spent_delta": 1e-6, "updates": 3,
                                "budget": 8.0}))
    acc = PrivacyAccountant(8.0, path=path)
    assert acc.spent_epsilon == 3.0
    assert acc.spent_delta == pytest.approx(1e-6 * (1 + math.exp(1.5)))


def test_central_gaussian_clips_in_l2_adds_nothing_and_charges_nothing():
    accountant = PrivacyAccountant(1.0)
    policy = PrivacyPolicy(PrivacyConfig("central-gaussian", epsilon=0.0, clip=0.5), accountant)
    pipe = UpdatePipeline(policy, Compressor(CompressionConfig(), 100))
    delta = np.full(100, 0.3, np.float32)  # L2 norm 3
    _, values = pipe.run(delta, rng=np.random.default_rng(0))
    np.testing.assert_allclose(values, delta * (0.5 / 3.0), rtol=1e-5)
    assert accountant.spent_epsilon == 0.0 and accountant.updates == 0
    assert PrivacyPolicy(PrivacyConfig("central-gaussian"), None).epsilon == 0.0


# -- the secure mode: discrete Laplace on a power-of-two grid -----------------------------------

def discrete(epsilon=1.0, clip=1.0):
    return PrivacyConfig(mechanism="discrete-laplace", epsilon=epsilon, clip=clip)


@pytest.mark.parametrize("t", [0.7, 3.0, 20.0])
def test_discrete_laplace_matches_its_pmf(t):
    """Chi-square goodness of fit of 200,000 draws against the pmf, tails pooled so that every
    bin expects at least 20 draws; a fixed key makes the test deterministic."""
    n = 200_000
    z = discrete_laplace(n, t, ChaChaUniforms(key=bytes(range(32))))
    assert z.dtype == np.int64
    support = np.arange(-int(12 * t) - 5, int(12 * t) + 6)
    expected = n * discrete_laplace_pmf(support, t)
    keep = support[expected >= 20]
    lo, hi = keep[0], keep[-1]
    observed = [np.sum(z < lo)] + [np.sum(z == v) for v in keep] + [np.sum(z > hi)]
    tail = n * discrete_laplace_pmf(np.arange(hi + 1, hi + 2000), t).sum()
    want = [tail] + list(n * discrete_laplace_pmf(keep, t)) + [tail]
    assert sum(want) == pytest.approx(n, rel=1e-9)
    assert stats.chisquare(observed, want).pvalue > 1e-4


def test_discrete_laplace_keystreams_differ_unless_the_key_is_given():
    a, b = ChaChaUniforms(), ChaChaUniforms()
    assert not np.array_equal(a.uniforms(64), b.uniforms(64))
    key = bytes(32)
    np.testing.assert_array_equal(ChaChaUniforms(key).uniforms(64), ChaChaUniforms(key).uniforms(64))
    u = ChaChaUniforms().uniforms(100_000)
    assert u.min() > 0.0 and u.max() <= 1.0


@pytest.mark.parametrize("epsilon, clip", [(1.0, 1.0), (0.3, 5.0), (8.0, 0.01)])
def test_discrete_laplace_updates_never_leave_their_grid(epsilon, clip):
    n = 5000
    pipe = UpdatePipeline(PrivacyPolicy(discrete(epsilon, clip), PrivacyAccountant(100.0)),
                          Compressor(CompressionConfig(), n))
    delta = np.random.default_rng(3).normal(size=n).astype(np.float32)
    _, values = pipe.run(delta, rng=np.random.default_rng(0))
    grid = grid_for(2 * clip / epsilon)
    assert grid == 2.0 ** math.floor(math.log2(2 * clip / epsilon / 1024))
    steps = values.astype(np.float64) / grid
    np.testing.assert_array_equal(steps, np.round(steps))  # every value a multiple of the grid
    # The noise has the Laplace scale 2C / epsilon: std sqrt(2) * scale (to 5 %).
    assert np.std(values) == pytest.approx(math.sqrt(2) * 2 * clip / epsilon, rel=0.05)
    assert pipe.policy.accountant.spent_epsilon == epsilon


def test_grid_truncation_never_grows_the_l1_norm():
    x = np.random.default_rng(1).normal(size=10_000)
    for grid in (2.0 ** -3, 2.0 ** -10):
        k = to_grid(x, grid)
        assert np.abs(k).sum() * grid <= np.abs(x).sum()
        assert np.all(np.abs(k * grid - x) < grid)
