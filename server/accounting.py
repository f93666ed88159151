"""The privacy of a central-DP run, for one device's whole data, from Google's ``dp-accounting``.

What is accounted
-----------------
Each round of DP-FedAvg (:mod:`edgefl_server.strategies.dpfedavg`) is one **Poisson-sampled
Gaussian mechanism** on the fleet: the server selects each online device independently with
probability ``q`` (:func:`edgefl_server.rounds.poisson_select`), every selected device sends its
update clipped to L2 norm ``C``, and the server releases the sum plus N(0, (z C)^2) per
coordinate (``z`` is the noise multiplier), divided by a fixed denominator. Adding or removing
one device (all its data: **user-level, add/remove adjacency**) changes the sum by at most ``C``,
so a round is :class:`dp_accounting.PoissonSampledDpEvent` (q, :class:`GaussianDpEvent` (z)), and
``T`` rounds compose to ``SelfComposedDpEvent(round, T)``. The RDP accountant
(:class:`dp_accounting.rdp.RdpAccountant`, Mironov 2017; Mironov, Talwar & Zhang 2019 for the
sampled Gaussian) turns that into ``epsilon`` at the run's ``delta``.

Why Poisson sampling: it is the sampling the accountant's amplification theorem is proven for
under add/remove adjacency, and it is what the server does in this mode. (Choosing a fixed number
of devices without replacement would need replace-one adjacency and its own analysis; the
server's usual fixed-size selection is therefore never used with central DP.)

The denominator ``q N`` uses ``N``, the number of eligible online devices when the round opens:
a count the retained device statuses make public, so the guarantee covers what a device's data
contributes to the sum (present or absent), not whether the device is in the fleet.

Who the guarantee is against: whoever sees the published models (every device, the broker,
anyone they reach). The amplification by sampling assumes that observer does not know who was
selected; the round announcement names the selected devices in the clear on the broker, so
against a reader of the round topic a device's guarantee is that of the Gaussian mechanism
composed over the rounds it took part in, reported as
:meth:`RunAccountant.epsilon_if_selection_known`.
The aggregator itself sees every clipped update: this mode trusts it (secure aggregation is the
planned mode that removes that trust).

Devices never import this module: ``dp-accounting`` is a server-only dependency.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

# At small fractional orders (1.1 to 1.5) and z near 1 the accountant's series for the sampled
# Gaussian does not converge; it then leaves that order out (its RDP counts as infinite, which
# can only make epsilon larger: the result stays an upper bound) and logs an absl WARNING per
# order and curve, dozens at start-up. Only errors are worth a line in the server's log.
logging.getLogger("absl").setLevel(logging.ERROR)


class PrivacyBudgetReached(RuntimeError):
    """Running one more round would take the run's epsilon over its target."""


class ParametersChanged(ValueError):
    """Rounds a run already released used another noise multiplier or sampling rate."""


def _dp():
    """``(dp_accounting, its rdp module, compute_epsilon)``, imported on first use.

    dp-accounting imports SciPy, about a second of CPU: a server without central DP, and each
    ingestion worker process it spawns (which imports this module with the server's
    configuration), should not pay it.
    """
    import dp_accounting  # deferred for start-up time (see the docstring), as are the next two
    from dp_accounting import rdp  # deferred
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon  # deferred
    return dp_accounting, rdp, compute_epsilon


def round_event(noise_multiplier: float, sampling_rate: float):
    """One DP-FedAvg round (a ``dp_accounting.DpEvent``): Gaussian with multiplier ``z`` on a
    Poisson sample of rate ``q``."""
    dp_accounting = _dp()[0]
    return dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))


@functools.lru_cache(maxsize=64)
def _round_rdp(noise_multiplier: float, sampling_rate: float) -> tuple[tuple, np.ndarray]:
    """The RDP curve of one round at the accountant's default orders (computed once: RDP
    composes by addition, so ``T`` rounds are ``T`` times this curve)."""
    accountant = _dp()[1].RdpAccountant()
    accountant.compose(round_event(noise_multiplier, sampling_rate))
    return tuple(accountant.orders), np.asarray(accountant.rdp, dtype=np.float64)


def run_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (RDP accountant, its default orders)."""
    if rounds == 0:
        return 0.0
    orders, curve = _round_rdp(float(noise_multiplier), float(sampling_rate))
    return float(_dp()[2](orders, rounds * curve, delta)[0])


def noise_multiplier_for(target_epsilon: float, delta: float, sampling_rate: float,
                         rounds: int) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within ``target_epsilon``.

    Uses :func:`dp_accounting.calibrate_dp_mechanism` (Brent's method on the RDP accountant's
    epsilon), then checks the result and nudges it up until it really is within the target.

    Raises
    ------
    ValueError
        For a target, delta, rate or number of rounds out of range.
    """
    _check_parameters(sampling_rate=sampling_rate, delta=delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be positive and finite, got {target_epsilon!r}")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    dp_accounting, rdp, _ = _dp()
    z = float(dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda z: dp_accounting.SelfComposedDpEvent(round_event(z, sampling_rate), rounds),
        target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6))
    while run_epsilon(z, sampling_rate, rounds, delta) > target_epsilon:
        z *= 1.0 + 1e-6
    return z


def _check_parameters(*, sampling_rate: float, delta: float, noise_multiplier: float = 1.0):
    if not (isinstance(sampling_rate, (int, float)) and 0.0 < sampling_rate <= 1.0):
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate!r}")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
            and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be positive and finite, got {noise_multiplier!r}")


@dataclass
class RunAccountant:
    """The (epsilon, delta) a central-DP run has spent, and whether one more round fits.

    Parameters
    ----------
    noise_multiplier : float
        ``z``: the server's noise has standard deviation ``z * clip`` per coordinate of the sum.
    sampling_rate : float
        ``q``: the probability with which each online device is selected in a round.
    delta : float
        The run's delta; epsilon is reported at it.
    target_epsilon : float, optional
        The run never releases a round that would take its epsilon above this.
    rounds : int
        Rounds already released (a resumed run restarts from its history).
    """

    noise_multiplier: float
    sampling_rate: float
    delta: float
    target_epsilon: float | None = None
    rounds: int = 0

    def __post_init__(self):
        _check_parameters(sampling_rate=self.sampling_rate, delta=self.delta,
                          noise_multiplier=self.noise_multiplier)
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon)
                                                    and self.target_epsilon > 0):
            raise ValueError(f"target epsilon must be positive and finite, got "
                             f"{self.target_epsilon!r}")

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` (default: those released)."""
        return run_epsilon(self.noise_multiplier, self.sampling_rate,
                           self.rounds if rounds is None else rounds, self.delta)

    def epsilon_if_selection_known(self, participations: int) -> float:
        """Epsilon at :attr:`delta` for a device whose ``participations`` are known to the
        observer (no amplification by sampling): the Gaussian mechanism composed that often."""
        if participations == 0:
            return 0.0
        dp_accounting, rdp, _ = _dp()
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(self.noise_multiplier), participations)
        return float(accountant.get_epsilon(self.delta))

    def resume(self, recorded: list[tuple[float, float]]) -> None:
        """Count the rounds released before this start, from the ``(z, q)`` each one recorded.

        A run keeps one noise multiplier and sampling rate: its epsilon composes the rounds it
        released, so those must be the rounds this accountant charges.

        Raises
        ------
        ParametersChanged
            If a recorded round used another ``z`` or ``q`` than this accountant (then nothing
            is counted).
        """
        for z, q in recorded:
            if not (math.isclose(z, self.noise_multiplier, rel_tol=1e-9)
                    and math.isclose(q, self.sampling_rate, rel_tol=1e-9)):
                raise ParametersChanged(
                    f"{len(recorded)} earlier round(s) used noise multiplier {z!r} and sampling "
                    f"rate {q!r}; this start would use noise multiplier "
                    f"{self.noise_multiplier!r} and sampling rate {self.sampling_rate!r}")
        self.rounds = len(recorded)

    def affords_round(self) -> bool:
        """Whether releasing one more round keeps epsilon within the target (always without one)."""
        return self.target_epsilon is None or self.epsilon(self.rounds + 1) <= self.target_epsilon

    def check_round(self) -> None:
        """Raise :class:`PrivacyBudgetReached` unless one more round fits the target."""
        if not self.affords_round():
            raise PrivacyBudgetReached(
                f"privacy target reached: {self.rounds} round(s) spent epsilon "
                f"{self.epsilon():.4g} at delta {self.delta:g} (user-level, add/remove one "
                f"device, RDP accountant) and one more would spend "
                f"{self.epsilon(self.rounds + 1):.4g}, above the target {self.target_epsilon:g}")

    def charge_round(self) -> tuple[float, float]:
        """Record one released round; return the run's (epsilon, delta) after it."""
        self.rounds += 1
        return self.epsilon(), self.delta

    def max_rounds(self, limit: int = 1_000_000) -> int | None:
        """The most rounds the target allows (None without a target), by bisection."""
        if self.target_epsilon is None:
            return None
        lo, hi = 0, 1
        while hi < limit and self.epsilon(hi) <= self.target_epsilon:
            lo, hi = hi, 2 * hi
        hi = min(hi, limit)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= self.target_epsilon else (lo, mid)
        return lo


@dataclass(frozen=True)
class CentralPrivacy:
    """A run's central DP settings, as ``edgefl server --privacy central`` gives them.

    Parameters
    ----------
    sampling_rate : float
        ``q``, the probability of selecting each eligible online device in a round.
    clip : float
        The L2 bound devices clip their update to.
    noise_multiplier : float, optional
        ``z``; without it, the smallest ``z`` whose run of ``rounds`` rounds stays within
        ``target_epsilon`` (:func:`noise_multiplier_for`).
    target_epsilon : float, optional
        The run stops before a round that would take its epsilon above it.
    delta : float
        The run's delta (at most 1e-5 is the usual choice; well below 1 / number of devices).
    server_lr : float
        DP-FedAvg's server learning rate.
    """

    sampling_rate: float
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    server_lr: float = 1.0

    def __post_init__(self):
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("central DP needs a noise multiplier (--noise-multiplier) or a "
                             "target epsilon (--target-epsilon) to calibrate one")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be positive and finite, got {self.clip!r}")
        _check_parameters(sampling_rate=self.sampling_rate, delta=self.delta,
                          noise_multiplier=self.noise_multiplier or 1.0)

    def accountant(self, rounds: int) -> RunAccountant:
        """The run's accountant, calibrating ``z`` for ``rounds`` rounds if none was given."""
        z = self.noise_multiplier
        if z is None:
            z = noise_multiplier_for(self.target_epsilon, self.delta, self.sampling_rate, rounds)
        return RunAccountant(noise_multiplier=z, sampling_rate=self.sampling_rate,
                             delta=self.delta, target_epsilon=self.target_epsilon)
