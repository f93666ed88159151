"""FedYogi: FedOpt with Yogi's additive second moment (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021; Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS
2018): ``v_t = v_{t-1} - (1 - beta_2) * Delta_t**2 * sign(v_{t-1} - Delta_t**2)``.
"""
from __future__ import annotations

from .aggregate import second_moment_yogi
from .fedopt import FedOpt


class FedYogi(FedOpt):
    """Yogi on the server over the mean client delta."""

    name = "fedyogi"

    def second_moment(self, v, delta):
        return second_moment_yogi(v, delta, self.options.beta_2)
