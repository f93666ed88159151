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
(:func:`edgefl.wire.refresh.apply_refresh`), which device and server compute identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgefl import kernels
from edgefl.wire.model import Model
from edgefl.wire.refresh import build_refresh

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

    def refresh(self, model: Model, target: np.ndarray, *, round_id: int):
        """Version ``model.version + 1`` as a refresh that moves ``model`` towards ``target``.

        Parameters
        ----------
        model : Model
            The model every device holds (the server's current model).
        target : numpy.ndarray
            The strategy's new weights (float32), computed from ``model.weights``: ``target -
            model.weights`` is this round's step, to which the residual of earlier rounds is
            added.
        round_id : int
            The round that produced the new version.

        Returns
        -------
        payload : bytes
            The refresh message (``docs/wire-format.md``).
        new_model : Model
            The new global model: exactly what a device rebuilds from ``payload``.

        The residual is updated in place only when this returns (a non-finite step raises
        ``ValueError`` and leaves it as it was).
        """
        published = model.weights
        step = (np.asarray(target, np.float64) - published).astype(np.float32)
        residual = self.residual.copy()
        indices, kept = kernels.topk_ef_(residual, step, self.config.k(self.num_params))
        if self.config.values == "f16":
            # Clip below half precision's overflow instead of failing: error feedback carries
            # the excess into the next refresh.
            kept = np.clip(kept, -65504.0, 65504.0)
        payload, refresh = build_refresh(
            published, indices, kept, self.config.values, base_version=model.version,
            version=model.version + 1, round_id=round_id, onnx_sha256=model.onnx_sha256)
        weights = refresh.apply(published)
        # Error feedback of everything the wire and the float32 addition did not carry.
        applied = weights[indices].astype(np.float64) - published[indices]
        residual[indices] += (kept.astype(np.float64) - applied).astype(np.float32)
        self.residual = residual
        return payload, model.with_weights(weights, version=refresh.version, round_id=round_id)
