"""FedTrimmedAvg: the coordinate-wise mean after trimming a fraction ``beta`` at each end.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (Flower's name and option ``beta``).

The rule is unweighted: a client's sample count is a claim a Byzantine client could inflate.
It needs every client's dense delta (see
:func:`~edgefl_server.strategies.aggregate.stack_dense`).
With few updates, ``floor(beta * n)`` may be 0: then nothing is trimmed (the plain mean).
"""
from __future__ import annotations

import dataclasses

from .aggregate import apply_delta, stack_dense, trimmed_mean
from .strategy import Strategy, check_range, weighted_deltas


class FedTrimmedAvg(Strategy):
    """The coordinate-wise mean after trimming a fraction ``beta`` of each end."""

    name = "fedtrimmedavg"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(Strategy.Options):
        """``beta``: fraction of the clients trimmed at each end of every coordinate."""

        beta: float = 0.2

        def __post_init__(self):
            check_range("beta", self.beta, 0.0, 0.5, hi_open=True)

    def aggregate(self, weights, updates):
        if not updates:
            return None
        matrix = stack_dense(weighted_deltas(updates), weights.size)
        return apply_delta(weights, trimmed_mean(matrix, self.options.beta))
