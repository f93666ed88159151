"""Aggregation strategies, by name: plain functions in :mod:`.aggregate`, classes that orchestrate.

=================  =================================================================
``fedavg``         :class:`FedAvg`, sample-weighted mean delta (McMahan et al. 2017)
``fedsgd``         :class:`FedSGD`, one full-batch step per client (McMahan et al. 2017)
``fedprox``        :class:`FedProx`, FedAvg + proximal term ``proximal_mu`` (Li et al. 2020)
``fedadam``        :class:`FedAdam`, server Adam (Reddi et al. 2021)
``fedyogi``        :class:`FedYogi`, server Yogi (Reddi et al. 2021)
``fedadagrad``     :class:`FedAdagrad`, server Adagrad (Reddi et al. 2021)
``fedmedian``      :class:`FedMedian`, coordinate-wise median (Yin et al. 2018)
``fedtrimmedavg``  :class:`FedTrimmedAvg`, coordinate-wise trimmed mean (Yin et al. 2018)
``krum``           :class:`Krum`, (multi-)Krum (Blanchard et al. 2017)
=================  =================================================================

:class:`DPFedAvg` (clipped sum plus Gaussian noise, user-level DP, McMahan et al. 2018) is not
chosen by name: the server aggregates with it when a run has central differential privacy, whose
sampling and accounting it depends on.
"""
from __future__ import annotations

from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .dpfedavg import DPFedAvg
from .fedavg import FedAvg
from .fedopt import FedOpt
from .fedprox import FedProx
from .fedmedian import FedMedian
from .fedsgd import FedSGD
from .fedtrimmedavg import FedTrimmedAvg
from .fedyogi import FedYogi
from .krum import Krum
from .strategy import ClientUpdate, Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedSGD, FedProx, FedAdam, FedYogi, FedAdagrad,
                              FedMedian, FedTrimmedAvg, Krum)
}


def make_strategy(name: str, options: dict | None = None) -> Strategy:
    """The strategy registered as ``name``, built with ``options`` (keyword arguments).

    Raises
    ------
    ValueError
        For an unknown name (listing the known ones) or a bad option.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}"
        )
    return cls(**(options or {}))


__all__ = [
    "STRATEGIES", "make_strategy", "Strategy", "ClientUpdate",
    "FedAvg", "FedSGD", "FedProx", "FedOpt", "FedAdam", "FedYogi", "FedAdagrad",
    "FedMedian", "FedTrimmedAvg", "Krum", "DPFedAvg",
]
