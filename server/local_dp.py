"""What the server can tell about the local DP it announces: what it costs devices, and whether
the run can learn at all.

Devices pay for local mechanisms from their own budgets (:mod:`edgefl.device.privacy`): a
replace-one epsilon per update, composed by basic composition. The server does not hold those
budgets, but knows every announcement and whose updates it accepted, so the aggregator reports
the most any device spent (:meth:`edgefl_server.aggregator.AggregationServer.privacy_report`).

Whether a run can learn: after an L1 clip to ``C`` (Laplace) the mean of ``m`` clipped updates
has, per coordinate of ``d``, a magnitude of at most ``C / d`` on average, while the noise of the
mean has standard deviation ``sqrt(2) * (2C / epsilon) / sqrt(m)``; over ``T`` rounds the signal
adds up ``T`` times and the noise ``sqrt(T)`` times. For Gaussian (L2 clip to ``C``) the signal is
at most ``C / sqrt(d)`` per coordinate and the noise ``sigma / sqrt(m)``. When even this best-case
signal stays below the noise over the whole run (``noise_to_signal > 1``), the run will not learn.
"""
from __future__ import annotations

import math

from edgefl.wire.calibration import local_noise_scale
from edgefl.wire.protocol import LOCAL_MECHANISMS, PrivacyConfig


def noise_to_signal(privacy: PrivacyConfig, num_params: int, devices_per_round: int,
                    rounds: int) -> float:
    """The ratio of the noise on the run's summed mean update to the largest possible signal,
    per coordinate (see the module docstring); 0 for non-local mechanisms."""
    if privacy.mechanism not in LOCAL_MECHANISMS:
        return 0.0
    scale = local_noise_scale(privacy)
    if privacy.mechanism == "gaussian":
        noise, signal = scale, privacy.clip / math.sqrt(num_params)
    else:
        noise, signal = math.sqrt(2.0) * scale, privacy.clip / num_params
    return noise / math.sqrt(devices_per_round * rounds) / signal


def swamp_warning(privacy: PrivacyConfig, num_params: int, devices_per_round: int,
                  rounds: int) -> str | None:
    """A message saying the run will not learn and what to change, or None if it might."""
    ratio = noise_to_signal(privacy, num_params, devices_per_round, rounds)
    if ratio <= 1.0:
        return None
    return (f"local DP ({privacy.mechanism}, epsilon {privacy.epsilon:g} per round, clip "
            f"{privacy.clip:g}) on a {num_params}-parameter update from {devices_per_round} "
            f"device(s) per round for {rounds} round(s): the expected noise is {ratio:.3g} times "
            "the largest signal the clipped updates can carry, so this run will not learn. Use "
            "central DP (--privacy central: devices clip, the server adds noise once to the sum; "
            "it needs hundreds of devices per round), or multiply epsilon per round by about "
            f"{ratio:.3g}, or devices per round times rounds by about {ratio ** 2:.3g}")
