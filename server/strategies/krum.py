"""Krum and multi-Krum: keep the deltas closest to their neighbours, drop the outliers.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017 (Flower's options ``num_malicious_clients``,
``num_clients_to_keep``).

The rule is unweighted: a client's sample count is a claim a Byzantine client could inflate.
Krum chooses whole deltas, so sparse deltas cannot freeze it: distances run over the coordinates
any client sent, a coordinate a client left out counting as 0 for it (with random-k from the
round's shared seed, exactly the coordinates every client sent). With ``n <= 2f + 2`` updates
Krum's guarantee does not hold: the round keeps the current model and the log says why.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .aggregate import apply_delta, krum_select, stack_senders
from .robust import RobustStrategy
from .strategy import Strategy, weighted_deltas

log = logging.getLogger(__name__)


class Krum(RobustStrategy):
    """Krum (``num_clients_to_keep=1``) or multi-Krum (the mean of the best-scored deltas)."""

    name = "krum"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(Strategy.Options):
        """``num_malicious_clients`` (f) tolerated; ``num_clients_to_keep`` (m) averaged."""

        num_malicious_clients: int = 0
        num_clients_to_keep: int = 1

        def __post_init__(self):
            for name, lo in (("num_malicious_clients", 0), ("num_clients_to_keep", 1)):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                    raise ValueError(f"option {name} must be an integer >= {lo}, got {value!r}")

    def aggregate(self, weights, updates):
        if not updates:
            return None
        senders = stack_senders(weighted_deltas(updates), weights.size)
        matrix = senders.zero_filled()
        keep = min(self.options.num_clients_to_keep, matrix.shape[0])
        try:
            chosen = krum_select(matrix, self.options.num_malicious_clients, keep)
        except ValueError as exc:
            log.warning("krum keeps the current model: %s", exc)
            return None
        delta = np.zeros(weights.size, np.float64)
        delta[senders.coordinates] = matrix[chosen].astype(np.float64).mean(axis=0)
        return apply_delta(weights, delta)
