"""The server's accountant of central DP against dp-accounting and a published reference value."""
import math

import numpy as np
import pytest

from edgefl_server.accounting import (CentralPrivacy, ParametersChanged, PrivacyBudgetReached,
                                      RunAccountant, noise_multiplier_for, run_epsilon)


@pytest.fixture(scope="module", name="dp_accounting")
def dp_accounting_module():
    """dp-accounting, imported by the tests that compare with it: its import takes about a
    second, which collecting the suite (twice in ``make test``) need not pay."""
    import dp_accounting

    return dp_accounting


def test_epsilon_after_each_round_equals_dp_accountings_for_the_same_events(dp_accounting):
    ours = RunAccountant(noise_multiplier=1.1, sampling_rate=0.05, delta=1e-5)
    theirs = dp_accounting.rdp.RdpAccountant()
    for _ in range(25):
        epsilon, delta = ours.charge_round()
        theirs.compose(dp_accounting.PoissonSampledDpEvent(
            0.05, dp_accounting.GaussianDpEvent(1.1)))
        assert epsilon == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-12) and delta == 1e-5
    assert ours.rounds == 25


def test_abadi_et_al_2016_moments_accountant_value_is_reproduced(dp_accounting):
    """Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Section 3.1: q = 0.01,
    sigma = 4, delta = 1e-5, T = 10,000 steps give epsilon ~= 1.26 with the moments accountant.

    The moments accountant is RDP at integer orders (lambda = alpha - 1 = 1..32) converted with
    epsilon = min over lambda of (alpha(lambda) + log(1/delta)) / lambda; with the accountant's
    RDP values at those orders that conversion gives 1.26 to the paper's two decimals. The RDP
    accountant's own conversion (Balle et al. 2020) is tighter, so its epsilon is lower."""
    orders = np.arange(2, 34)
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(orders))
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(4.0)), 10_000))
    moments = min(accountant.rdp + math.log(1 / 1e-5) / (orders - 1))
    assert round(moments, 2) == 1.26
    ours = run_epsilon(4.0, 0.01, 10_000, 1e-5)
    assert 0.9 < ours < moments


def test_noise_multiplier_for_a_target_is_the_smallest_that_fits():
    z = noise_multiplier_for(8.0, 1e-5, 0.1, 100)
    assert run_epsilon(z, 0.1, 100, 1e-5) <= 8.0
    assert run_epsilon(z * 0.99, 0.1, 100, 1e-5) > 8.0
    # More rounds or a smaller target need more noise.
    assert noise_multiplier_for(8.0, 1e-5, 0.1, 400) > z
    assert noise_multiplier_for(2.0, 1e-5, 0.1, 100) > z


def test_the_budget_refuses_the_round_that_would_exceed_it():
    z = noise_multiplier_for(3.0, 1e-5, 0.2, 10)
    accountant = RunAccountant(noise_multiplier=z, sampling_rate=0.2, delta=1e-5,
                               target_epsilon=3.0)
    assert accountant.max_rounds() == 10
    for _ in range(10):
        accountant.check_round()
        accountant.charge_round()
    assert accountant.epsilon() <= 3.0
    assert not accountant.affords_round()
    with pytest.raises(PrivacyBudgetReached, match=r"10 round\(s\) spent epsilon .* above the "
                                                   r"target 3"):
        accountant.check_round()
    assert accountant.rounds == 10


def test_a_resumed_run_counts_its_recorded_rounds_and_refuses_other_parameters():
    """50 rounds at the z calibrated for 100 spend epsilon 5.96; recalibrating for 1000 rounds
    (z 2.17) and counting those 50 rounds at it would report 1.64."""
    central = CentralPrivacy(sampling_rate=0.1, target_epsilon=8.0)
    first = central.accountant(100)
    recorded = [(first.noise_multiplier, 0.1)] * 50
    resumed = central.accountant(100)
    resumed.resume(recorded)
    assert resumed.rounds == 50
    assert resumed.epsilon() == pytest.approx(5.96, abs=0.01)
    assert resumed.epsilon() == run_epsilon(first.noise_multiplier, 0.1, 50, 1e-5)
    longer = central.accountant(1000)
    assert longer.noise_multiplier == pytest.approx(2.17, abs=0.01)
    with pytest.raises(ParametersChanged, match=r"50 earlier round\(s\) used noise multiplier "
                                                r"0\.99"):
        longer.resume(recorded)
    assert longer.rounds == 0
    with pytest.raises(ParametersChanged, match="sampling rate 0.2"):
        central.accountant(100).resume([(first.noise_multiplier, 0.2)])


def test_the_accountant_logs_no_absl_warning_at_small_orders(caplog, dp_accounting):
    """dp-accounting's series for fractional orders near 1 does not converge at q 0.1, z ~1
    and it drops those orders (only ever raising epsilon); its absl warnings are kept out."""
    import logging
    with caplog.at_level(logging.WARNING):
        z = noise_multiplier_for(8.0, 1e-5, 0.1, 100)
        epsilon = run_epsilon(z * 1.0001, 0.1, 50, 1e-5)
    assert "failed to converge" not in caplog.text
    theirs = dp_accounting.rdp.RdpAccountant()
    theirs.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(z * 1.0001)), 50))
    assert epsilon == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-12)


def test_a_known_selection_loses_the_amplification(dp_accounting):
    accountant = RunAccountant(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5, rounds=100)
    plain = dp_accounting.rdp.RdpAccountant()
    plain.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    assert accountant.epsilon_if_selection_known(3) == plain.get_epsilon(1e-5)
    assert accountant.epsilon_if_selection_known(0) == 0.0
    assert accountant.epsilon_if_selection_known(3) > accountant.epsilon()


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=0.0, sampling_rate=0.1, delta=1e-5), "noise multiplier"),
    (dict(noise_multiplier=1.0, sampling_rate=0.0, delta=1e-5), "sampling rate"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, delta=0.0), "delta"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5, target_epsilon=-1.0), "target"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunAccountant(**kwargs)
