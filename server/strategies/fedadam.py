"""FedAdam: FedOpt with Adam's second moment (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021): ``v_t = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t**2``.
"""
from __future__ import annotations

from .aggregate import second_moment_adam
from .fedopt import FedOpt


class FedAdam(FedOpt):
    """Adam on the server over the mean client delta."""

    name = "fedadam"

    def second_moment(self, v, delta):
        return second_moment_adam(v, delta, self.options.beta_2)
