"""FedAdagrad: FedOpt with Adagrad's accumulated second moment (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): ``v_t = v_{t-1} + Delta_t**2``.

``beta_2`` plays no part here. ``beta_1`` defaults to 0 (no server momentum), as in the paper's
FedAdagrad experiments and Flower's default.
"""
from __future__ import annotations

import dataclasses

from .aggregate import second_moment_adagrad
from .fedopt import FedOpt


class FedAdagrad(FedOpt):
    """Adagrad on the server over the mean client delta."""

    name = "fedadagrad"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(FedOpt.Options):
        """FedOpt's options with Adagrad's defaults (no momentum, a larger server step)."""

        eta: float = 1e-1
        beta_1: float = 0.0

    def second_moment(self, v, delta):
        return second_moment_adagrad(v, delta)
