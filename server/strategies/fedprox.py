"""FedProx: FedAvg whose clients train with a proximal term ``mu/2 * ||w - w_global||^2``.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks",
MLSys 2020. The term keeps local models near the global one on non-IID data. The server side is
FedAvg; the only change is ``proximal_mu``, announced to devices as ``TrainingConfig.mu``.
"""
from __future__ import annotations

import dataclasses

from edgefl.wire.protocol import TrainingConfig

from .fedavg import FedAvg
from .strategy import check_range


class FedProx(FedAvg):
    """FedAvg plus the proximal term ``proximal_mu`` in every client's local objective."""

    name = "fedprox"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(FedAvg.Options):
        """``proximal_mu``: weight of the proximal term (the paper's mu; 0 is plain FedAvg)."""

        proximal_mu: float = 0.01

        def __post_init__(self):
            check_range("proximal_mu", self.proximal_mu, 0.0, 1e6)

    def configure_training(self, config: TrainingConfig) -> TrainingConfig:
        return dataclasses.replace(config, mu=float(self.options.proximal_mu))
