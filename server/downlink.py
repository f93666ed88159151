"""Compressed model refreshes: the server's side of sending v -> v+1 as a sparse, quantized delta.

Sparse ternary compression (Sattler, Wiedemann, Müller, Samek, "Robust and Communication-Efficient
Federated Learning from Non-IID Data", IEEE TNNLS 2019) compresses both directions: the server
does not publish the strategy's new weights, it publishes ``published + C(step + residual)``,
where ``C`` keeps the ``k`` largest coordinates and rounds them to the value encoding, and keeps
what ``C`` left out in a residual that joins the next round's step (error feedback). So

* the global model *is* the sum of the deltas the devices received: a device that applies every
  delta holds exactly the server's model, bit for bit, and never drifts from it;
* nothing of the strategy's step is lost, only delayed until it is large enough to be sent.

:class:`DownlinkCompressor` holds the residual (persisted with the server's state) and makes one
refresh per new version. Applying a delta is one IEEE binary32 addition per kept coordinate
(:func:`apply_refresh`), which device and server compute identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgefl import kernels

#: Value encodings a refresh can carry (the update format's, ``docs/wire-format.md``).
REFRESH_VALUES = ("f32", "f16", "int8", "ternary")


@dataclass(frozen=True)
class DownlinkConfig:
    """How the server compresses model refreshes.

    Parameters
    ----------
    density : float
        Fraction of the coordinates a refresh carries, in (0, 1].
    values : str
        Value encoding of the kept coordinates: ``f32``, ``f16``, ``int8`` or ``ternary``.
    max_behind : int
        A device at most this many versions behind gets the deltas it missed, one after the
        other; further behind (or new) it gets the full model envelope.
    """

    density: float = 0.05
    values: str = "f16"
    max_behind: int = 8

    def __post_init__(self):
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise ValueError(f"downlink density must be in (0, 1], got {self.density!r}")
        if self.values not in REFRESH_VALUES:
            raise ValueError(f"unknown downlink value encoding {self.values!r}: use one of "
                             f"{REFRESH_VALUES}")
        if isinstance(self.max_behind, bool) or not isinstance(self.max_behind, int) \
                or not 0 <= self.max_behind <= 1024:
            raise ValueError(f"max_behind must be an integer in 0..1024, got {self.max_behind!r}")

    def k(self, num_params: int) -> int:
        """Coordinates one refresh carries: ``ceil(density * num_params)``."""
        return min(num_params, max(1, math.ceil(self.density * num_params)))


def apply_refresh(weights: np.ndarray, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``weights`` with ``values`` added at ``indices`` in binary32 (a new array).

    The one arithmetic rule of a refresh: ``w[i] = fl32(w[i] + v)``, round to nearest even, the
    same on every IEEE machine, so a device reconstructs the server's weights exactly.
    """
    out = np.array(weights, dtype=np.float32, copy=True)
    out[indices] = out[indices] + np.asarray(values, dtype=np.float32)
    return out


class DownlinkCompressor:
    """Top-k with error feedback on the server's model steps (the downlink half of STC).

    Parameters
    ----------
    config : DownlinkConfig
    num_params : int
        Length of the model's flat weight vector.
    residual : numpy.ndarray, optional
        The residual saved with the server's state (zeros for a new run).
    """

    def __init__(self, config: DownlinkConfig, num_params: int,
                 residual: np.ndarray | None = None):
        self.config = config
        self.num_params = int(num_params)
        if residual is None:
            residual = np.zeros(self.num_params, np.float32)
        residual = np.array(residual, dtype=np.float32, copy=True)
        if residual.shape != (self.num_params,) or not np.isfinite(residual).all():
            raise ValueError(f"the saved downlink residual has shape {residual.shape} (expected "
                             f"({self.num_params},)) or non-finite values: the state directory "
                             "belongs to another model")
        self.residual = residual

    def refresh(self, published: np.ndarray, target: np.ndarray):
        """The delta that moves ``published`` towards ``target``, and where it lands.

        Parameters
        ----------
        published : numpy.ndarray
            The model every device holds (float32).
        target : numpy.ndarray
            The strategy's new weights (float32), computed from ``published``: ``target -
            published`` is this round's step, to which the residual of earlier rounds is added.

        Returns
        -------
        indices : numpy.ndarray
            Sorted uint32 coordinates, ``k`` of them.
        values : numpy.ndarray
            float32 values, exactly what the value encoding carries.
        weights : numpy.ndarray
            ``apply_refresh(published, indices, values)``: the new global model.

        The residual is updated in place only when this returns (a non-finite step raises
        ``ValueError`` and leaves it as it was).
        """
        published = np.ascontiguousarray(published, dtype=np.float32)
        step = (np.asarray(target, np.float64) - published).astype(np.float32)
        residual = self.residual.copy()
        indices, kept = kernels.topk_ef_(residual, step, self.config.k(self.num_params))
        values = _quantized(kept, self.config.values)
        weights = apply_refresh(published, indices, values)
        # Error feedback of everything the wire and the float32 addition did not carry.
        applied = weights[indices].astype(np.float64) - published[indices]
        residual[indices] += (kept.astype(np.float64) - applied).astype(np.float32)
        self.residual = residual
        return indices, values, weights


def _quantized(values: np.ndarray, encoding: str) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if encoding == "f32" or values.size == 0:
        return values
    if encoding == "f16":
        # Clip below half precision's overflow instead of failing: error feedback carries the
        # excess into the next refresh.
        values = np.clip(values, -65504.0, 65504.0)
    blob, scale = kernels.quantize(values, encoding)
    return kernels.dequantize(blob, encoding, values.size, scale)
