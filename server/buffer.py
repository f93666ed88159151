"""Buffered asynchronous aggregation (FedBuff): accept updates on recent versions, aggregate every K.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022. Devices do not wait for a round: each trains on the
newest model it has and sends when it can. The server

* accepts an update trained on any of the last ``max_staleness + 1`` versions (its *staleness*
  ``current - base`` is at most ``max_staleness``), whatever round it was sent for; an older one
  gets a receipt saying it is too stale, and the device trains again on the newest model. Each
  round announcement carries ``max_staleness``, so a device keeps (and resends) an update of an
  earlier round while it can still count and drops it once it cannot
  (:func:`edgefl.device.outbox.why_expired`);
* scales each update by ``1 / sqrt(1 + staleness)`` (the paper's polynomial staleness weight), so
  an update computed on an older model moves the model less;
* aggregates every ``buffer_size`` accepted updates with the server's strategy into a new version.

Pure logic, no MQTT or storage: :mod:`edgefl_server.aggregator` keeps the buffer durable (an
accepted update is on disk before its receipt; aggregating it and marking it counted is one
transaction, so across restarts each update is counted exactly once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


@dataclass(frozen=True)
class BufferConfig:
    """FedBuff's two knobs.

    Parameters
    ----------
    buffer_size : int
        Accepted updates (K) that make a new model version.
    max_staleness : int
        Most versions an update's base may be behind the current model (S).
    """

    buffer_size: int = 5
    max_staleness: int = 4

    def __post_init__(self):
        for name, lo in (("buffer_size", 1), ("max_staleness", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 1 << 20:
                raise ValueError(f"{name} must be an integer in {lo}..{1 << 20}, got {value!r}")

    def too_stale(self, base_version: int, current_version: int) -> str | None:
        """Why an update trained on ``base_version`` cannot be accepted now, or None."""
        if base_version > current_version:
            return (f"trained on model version {base_version}, newer than the server's "
                    f"{current_version}")
        staleness = current_version - base_version
        if staleness > self.max_staleness:
            return (f"too stale: trained on model version {base_version}, {staleness} versions "
                    f"behind the current {current_version} (at most {self.max_staleness} are "
                    f"accepted); train again on the current model")
        return None


def staleness_weight(staleness: int) -> float:
    """FedBuff's weight of an update ``staleness`` versions old: ``1 / sqrt(1 + staleness)``."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


class ScaledUpdate(NamedTuple):
    """An update as a strategy reads it, its delta scaled by its staleness weight."""

    indices: np.ndarray | None
    values: np.ndarray
    num_samples: int


def scaled_by_staleness(updates: Sequence, current_version: int) -> list[ScaledUpdate]:
    """The buffered ``updates`` (with ``base_version``) scaled for aggregation onto
    ``current_version``.

    The sample counts stay as they are, so a sample-weighted mean becomes FedBuff's
    ``sum_i n_i s(tau_i) delta_i / sum_i n_i``: stale updates shrink the step instead of being
    renormalised away.
    """
    out = []
    for u in updates:
        weight = staleness_weight(current_version - u.base_version)
        out.append(ScaledUpdate(u.indices, (u.values.astype(np.float64) * weight).astype(np.float32),
                                u.num_samples))
    return out
