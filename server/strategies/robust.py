"""What the robust rules (median, trimmed mean, Krum) share: unweighted, and how they meet sparsity.

A robust rule bounds what a minority of clients can do to the model, so it ignores sample counts
(a Byzantine client could claim any number) and never reads a coordinate a client did not send as
"sent zero". The coordinate-wise rules (:class:`CoordinateRule`) take, per coordinate, the order
statistic of the clients that sent it, over the coordinates at least ``min_senders`` clients sent;
other coordinates stay where they are this round.

How well that works depends on the devices' sparsification:

* dense updates: every client sends every coordinate, the rules are the papers' rules;
* ``randomk``: the indices come from the round's shared seed, so every client sends the same
  coordinates and the rule runs over exactly those, with every client counted (overlap by
  construction);
* ``topk`` / ``threshold``: each device picks the coordinates from its own data, so a coordinate
  is decided by whichever few clients happened to send it. The model still moves (it does not
  freeze on a median of absent zeros), but the robustness guarantee weakens where few clients
  overlap: the server warns about this pairing (:meth:`RobustStrategy.compression_warning`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from edgefl.wire.protocol import CompressionConfig

from .aggregate import apply_delta, robust_delta, stack_senders
from .strategy import Strategy, weighted_deltas

#: Sparsification methods whose indices depend on each device's data.
DATA_DEPENDENT = ("topk", "threshold")


class RobustStrategy(Strategy):
    """Base of the Byzantine-robust rules: unweighted, warned when paired with top-k/threshold."""

    def compression_warning(self, compression: CompressionConfig) -> str | None:
        if compression.method not in DATA_DEPENDENT:
            return None
        return (f"strategy {self.name} with {compression.method} sparsification: each device "
                f"picks its coordinates from its own data, so a coordinate is aggregated over "
                f"the few devices that sent it and a poisoned minority can dominate it; use "
                f"randomk (indices from the round's shared seed, the same on every device) or "
                f"dense updates for the rule's guarantee")


class CoordinateRule(RobustStrategy):
    """A coordinate-wise order statistic over the clients that sent each coordinate."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(Strategy.Options):
        """``min_senders``: clients that must have sent a coordinate for it to move this round
        (capped at the round's number of updates)."""

        min_senders: int = 3

        def __post_init__(self):
            value = self.min_senders
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"option min_senders must be an integer >= 1, got {value!r}")

    def rule(self, matrix: np.ndarray) -> np.ndarray:
        """Per column of ``matrix`` (clients x coordinates, NaN = not sent), the aggregate."""
        raise NotImplementedError

    def aggregate(self, weights, updates):
        if not updates:
            return None
        senders = stack_senders(weighted_deltas(updates), weights.size)
        return apply_delta(weights, robust_delta(self.rule, senders, weights.size,
                                                 self.options.min_senders))

