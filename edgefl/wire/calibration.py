"""What a round's privacy config means in noise: the calibration device and server both compute.

The device adds noise of this scale (:mod:`edgefl.device.privacy`); the server computes the same
scale to tell, before a run, whether local DP can learn at all (:mod:`edgefl_server.local_dp`).
Local mechanisms are calibrated for replace-one sensitivity ``2C``: two clipped updates differ by
up to twice the clip bound.

The Gaussian's sigma comes from the *analytic* Gaussian mechanism (Balle & Wang, ICML 2018): the
smallest sigma for which the privacy loss satisfies
``Phi(D/(2 sigma) - eps sigma/D) - e^eps Phi(-D/(2 sigma) - eps sigma/D) <= delta`` for
sensitivity ``D``. It is exact for every epsilon > 0, unlike the classic
``sigma = D sqrt(2 ln(1.25/delta)) / epsilon``, proven only for epsilon < 1 and larger than needed.
"""
from __future__ import annotations

import math

from edgefl.wire.protocol import PrivacyConfig

#: Above this epsilon, e^epsilon overflows the analytic Gaussian calibration (and protects nothing).
MAX_GAUSSIAN_EPSILON = 500.0


def classic_gaussian_sigma(clip: float, epsilon: float, delta: float) -> float:
    """``C * sqrt(2 ln(1.25 / delta)) / epsilon`` (Dwork & Roth, Thm. A.1; valid for epsilon < 1).

    For comparison only: the policy uses :func:`analytic_gaussian_sigma`, which is never larger.
    """
    return clip * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def _phi(t: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def analytic_gaussian_delta(sigma: float, clip: float, epsilon: float) -> float:
    """The smallest delta for which N(0, sigma^2) noise on an L2-sensitivity-``clip`` query is
    (epsilon, delta)-DP (Balle & Wang 2018, Theorem 8)."""
    a, b = clip / (2.0 * sigma), epsilon * sigma / clip
    tail = _phi(-a - b)
    return _phi(a - b) - (math.exp(epsilon) * tail if tail > 0.0 else 0.0)


def analytic_gaussian_sigma(clip: float, epsilon: float, delta: float) -> float:
    """The smallest sigma (to 1e-12 relative) making the Gaussian mechanism (epsilon, delta)-DP.

    Bisection on :func:`analytic_gaussian_delta`, which decreases in sigma; the upper end of the
    final bracket is returned, so the result always satisfies the bound.
    """
    hi = clip
    while analytic_gaussian_delta(hi, clip, epsilon) > delta:
        hi *= 2.0
    lo = hi
    while analytic_gaussian_delta(lo, clip, epsilon) <= delta and lo > clip * 1e-12:
        lo /= 2.0
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(mid, clip, epsilon) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def local_noise_scale(config: PrivacyConfig) -> float:
    """The noise scale of a local mechanism for replace-one sensitivity ``2C``: the Laplace scale
    ``2C / epsilon``, or the Gaussian sigma for (epsilon, delta)."""
    if config.mechanism in ("laplace", "discrete-laplace"):
        return 2.0 * config.clip / config.epsilon
    if config.mechanism == "gaussian":
        return analytic_gaussian_sigma(2.0 * config.clip, config.epsilon, config.delta)
    raise ValueError(f"{config.mechanism!r} is not a local mechanism")
