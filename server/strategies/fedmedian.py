"""FedMedian: the coordinate-wise median of the clients' deltas.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018.

The rule is unweighted: a client's sample count is a claim a Byzantine client could inflate.
Sparse updates: the median runs over the clients that sent each coordinate (see
:mod:`~edgefl_server.strategies.robust`).
"""
from __future__ import annotations

from .aggregate import coordinate_median
from .robust import CoordinateRule


class FedMedian(CoordinateRule):
    """The coordinate-wise median of the clients' deltas."""

    name = "fedmedian"

    def rule(self, matrix):
        return coordinate_median(matrix)
