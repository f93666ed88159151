"""FedAvg: the sample-weighted mean of the clients' deltas.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017. Each client's delta counts in proportion to its
number of training samples n_k: ``w_{t+1} = w_t + sum_k n_k * delta_k / sum_k n_k``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .aggregate import apply_delta, weighted_mean_delta
from .strategy import ClientUpdate, Strategy, weighted_deltas


class FedAvg(Strategy):
    """Federated averaging of sample-weighted deltas; sparse deltas count as zero elsewhere."""

    name = "fedavg"

    def mean_delta(self, weights: np.ndarray, updates: Sequence[ClientUpdate]) -> np.ndarray | None:
        """The sample-weighted mean delta of ``updates``, or None when no samples arrived."""
        if not updates:
            return None
        return weighted_mean_delta(weighted_deltas(updates), weights.size)

    def aggregate(self, weights, updates):
        delta = self.mean_delta(weights, updates)
        return None if delta is None else apply_delta(weights, delta)
