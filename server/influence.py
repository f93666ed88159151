"""How much one device can move the global model: a cap on its weight and on its update's size.

Signatures and logins decide *who* may send an update; they say nothing about whether a
provisioned device tells the truth. A device's weight in FedAvg is the sample count it claims,
and its pull is its update's length, so a broken or hostile device could dominate a round by
claiming a million samples or sending a huge delta. The server therefore bounds both for every
update, by default:

* the claimed sample count is capped at ``max_samples`` (the update still counts, with that
  weight): counted as ``samples_capped``;
* an update whose L2 norm exceeds ``max_update_norm`` is scaled down to it (its direction is
  kept): counted as ``norm_clipped``.

Bounded, not refused: an honest device with unusually much data or a large step still helps.
The defaults sit well above what honest devices send in the digits evaluation (a few hundred
samples each; update norms up to about 10 in the first rounds, falling after) and far below what
a hostile device needs to dominate a round; set them to what your fleet's data justifies.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

#: Default cap on the sample count one update may claim.
DEFAULT_MAX_SAMPLES = 10_000
#: Default L2 norm an update is clipped to.
DEFAULT_MAX_UPDATE_NORM = 100.0


@dataclass(frozen=True)
class InfluenceBounds:
    """The bounds applied to every accepted update (see the module docstring).

    Parameters
    ----------
    max_samples : int, optional
        Cap on the claimed sample count; None removes the cap.
    max_update_norm : float, optional
        L2 norm an update is clipped to; None removes the bound.
    """

    max_samples: int | None = DEFAULT_MAX_SAMPLES
    max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM

    def __post_init__(self):
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or not isinstance(
                self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"max_samples must be an integer >= 1 or None, got {self.max_samples!r}")
        if self.max_update_norm is not None and not (
                isinstance(self.max_update_norm, (int, float))
                and math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ValueError(f"max_update_norm must be a positive number or None, got "
                             f"{self.max_update_norm!r}")

    def apply(self, update):
        """``update`` within the bounds, and the reason codes of what was bounded.

        ``update`` is an :class:`edgefl.wire.Update` (any frozen dataclass with ``num_samples``
        and float32 ``values`` works); the result is a copy when something changed.
        """
        reasons = []
        changes = {}
        if self.max_samples is not None and update.num_samples > self.max_samples:
            changes["num_samples"] = self.max_samples
            reasons.append("samples_capped")
        if self.max_update_norm is not None:
            values = np.asarray(update.values, np.float64)
            norm = math.sqrt(float(np.dot(values, values)))
            if norm > self.max_update_norm:
                scaled = (values * (self.max_update_norm / norm)).astype(np.float32)
                # float32 rounding may leave the norm a hair above the bound: shrink once more.
                while float(np.linalg.norm(scaled.astype(np.float64))) > self.max_update_norm:
                    scaled = np.nextafter(scaled, np.float32(0))
                changes["values"] = scaled
                reasons.append("norm_clipped")
        return (dataclasses.replace(update, **changes) if changes else update), reasons
