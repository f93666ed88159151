"""FedMedian: the coordinate-wise median of the clients' deltas.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018.

The rule is unweighted: a client's sample count is a claim a Byzantine client could inflate.
It needs every client's dense delta (see
:func:`~edgefl_server.strategies.aggregate.stack_dense`).
"""
from __future__ import annotations

from .aggregate import apply_delta, coordinate_median, stack_dense
from .strategy import Strategy, weighted_deltas


class FedMedian(Strategy):
    """The coordinate-wise median of the clients' deltas."""

    name = "fedmedian"

    def aggregate(self, weights, updates):
        if not updates:
            return None
        return apply_delta(weights, coordinate_median(stack_dense(weighted_deltas(updates),
                                                                  weights.size)))
