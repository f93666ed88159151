"""DP-FedAvg: user-level differential privacy by clipping on devices and noising the sum.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018, Algorithm 1 with flat clipping and the fixed-denominator estimator: every selected
device sends its delta clipped to L2 norm ``C`` (mechanism ``central-gaussian``), the server adds
N(0, (z C)^2) to each coordinate of the *sum* and divides by the expected number of participants
``q N`` (not by the number that arrived, which would make the sensitivity depend on the sample):

    w_{t+1} = w_t + server_lr * (sum_k clip(delta_k, C) + N(0, z^2 C^2 I)) / (q N)

Devices count equally (their sample counts are ignored: weighting by them would let one device's
data move the sum by more than ``C``). The server clips every update to ``C`` again, so the bound
holds even for an update that f16 rounding or a faulty device pushed past it. A round in which
nothing arrived still releases noise: keeping the model instead would tell whoever watches the
models that no selected device answered. The privacy of the run is accounted by
:mod:`edgefl_server.accounting`.

This mode trusts the aggregator with each device's clipped update (secure aggregation, planned,
removes that trust). The noise is float64 Gaussian from NumPy's generator seeded with 128 bits
from :mod:`secrets`; float sampling is subject to Mironov's (CCS 2012) attack in principle.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Sequence

import numpy as np

from .aggregate import apply_delta, noised_clipped_sum
from .fedavg import FedAvg
from .strategy import ClientUpdate, check_range

log = logging.getLogger(__name__)


class DPFedAvg(FedAvg):
    """FedAvg with per-device L2 clipping and Gaussian noise on the sum (user-level central DP).

    Options
    -------
    clip : float
        The L2 bound ``C`` devices clip to (announced to them by the server).
    noise_multiplier : float
        ``z``: the noise's standard deviation per coordinate is ``z * clip``.
    expected_clients : float
        The fixed denominator ``q N``; the server passes each round's value to
        :meth:`aggregate`, this is only the default.
    server_lr : float
        Server learning rate applied to the noised mean.
    noise_seed : int, optional
        Makes the noise reproducible, for simulations and tests only: whoever knows the seed can
        subtract the noise. Logged as a warning.
    """

    name = "dpfedavg"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(FedAvg.Options):
        clip: float = 1.0
        noise_multiplier: float = 1.0
        expected_clients: float = 1.0
        server_lr: float = 1.0
        noise_seed: int | None = None

        def __post_init__(self):
            check_range("clip", self.clip, 0.0, 1e6, lo_open=True)
            check_range("noise_multiplier", self.noise_multiplier, 0.0, 1e6)
            check_range("expected_clients", self.expected_clients, 0.0, 1e12, lo_open=True)
            check_range("server_lr", self.server_lr, 0.0, 1e6, lo_open=True)

    def __init__(self, **options):
        super().__init__(**options)
        seed = self.options.noise_seed
        if seed is not None:
            log.warning("DP-FedAvg noise seeded with %d: reproducible noise can be subtracted by "
                        "anyone who knows the seed; for simulations only", seed)
        self._rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)

    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the sum."""
        return self.options.noise_multiplier * self.options.clip

    def aggregate(self, weights: np.ndarray, updates: Sequence[ClientUpdate], *,
                  expected_clients: float | None = None) -> np.ndarray:
        denominator = self.options.expected_clients if expected_clients is None \
            else float(expected_clients)
        check_range("expected_clients", denominator, 0.0, 1e12, lo_open=True)
        total = noised_clipped_sum(updates, weights.size, clip=self.options.clip,
                                   noise_std=self.noise_std(), rng=self._rng)
        return apply_delta(weights, total, self.options.server_lr / denominator)

    def aggregate_round(self, weights, updates, *, expected_clients):
        # Also when nothing arrived: the noise is released either way (see the module docstring).
        return self.aggregate(weights, updates, expected_clients=expected_clients)
