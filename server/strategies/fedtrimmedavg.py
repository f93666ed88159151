"""FedTrimmedAvg: the coordinate-wise mean after trimming a fraction ``beta`` at each end.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (Flower's name and option ``beta``).

The rule is unweighted: a client's sample count is a claim a Byzantine client could inflate.
Sparse updates: each coordinate is trimmed among the clients that sent it (see
:mod:`~edgefl_server.strategies.robust`). With few senders, ``floor(beta * c)`` may be 0: then
nothing is trimmed there (the plain mean).
"""
from __future__ import annotations

import dataclasses

from .aggregate import trimmed_mean
from .robust import CoordinateRule
from .strategy import check_range


class FedTrimmedAvg(CoordinateRule):
    """The coordinate-wise mean after trimming a fraction ``beta`` of each end."""

    name = "fedtrimmedavg"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(CoordinateRule.Options):
        """``beta``: fraction of the clients trimmed at each end of every coordinate."""

        beta: float = 0.2

        def __post_init__(self):
            super().__post_init__()
            check_range("beta", self.beta, 0.0, 0.5, hi_open=True)

    def rule(self, matrix):
        return trimmed_mean(matrix, self.options.beta)
