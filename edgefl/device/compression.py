"""Sparsifying and quantizing an update so it costs few bytes on the air.

Methods (``CompressionConfig.method``):

* ``none``: every coordinate (dense).
* ``topk``: the ``k = ceil(density * n)`` largest magnitudes, with *error feedback*: what is not
  sent (and the quantization error of what is) stays in a residual that is added to the next
  round's update, so nothing is lost, only delayed. The residual lives as long as the Compressor.
* ``threshold``: every coordinate whose accumulated value exceeds ``tau`` in magnitude ("send only
  what moved"), with the same error feedback.
* ``randomk``: ``k`` indices drawn from the round's server seed, independently of the data; no
  residual (the indices do not depend on the update, so nothing is held back on purpose).

Values (``CompressionConfig.values``): ``f32``, ``f16``, ``int8`` (one scale) or ``ternary``
(sign times one scale, as in sparse ternary compression). The compressor returns float32 values
that are exactly what the wire format will carry, so the error feedback accounts for rounding.

Privacy: top-k and threshold pick indices *from the data*. On a clean update that leaks which
coordinates moved most, so :class:`~edgefl.device.update_pipeline.UpdatePipeline` feeds them only the
already-noised update when differential privacy is on (post-processing), and the clean one only
when it is off. Call :meth:`Compressor.sparsify` directly only with that in mind.
"""
from __future__ import annotations

import math

import numpy as np

from edgefl import kernels
from edgefl.wire.protocol import CompressionConfig

METHODS = ("none", "topk", "threshold", "randomk")
VALUE_ENCODINGS = ("f32", "f16", "int8", "ternary")
#: Magnitudes from here on round to infinity in IEEE half precision (65504 is the largest half).
F16_OVERFLOW = 65520.0


class Compressor:
    """Sparsification (with a persistent error-feedback residual) and value quantization.

    Parameters
    ----------
    config : edgefl.wire.protocol.CompressionConfig
        Method, density (``topk``/``randomk``), tau (``threshold``) and value encoding.
    num_params : int
        Length of the updates this compressor sees.

    Raises
    ------
    ValueError
        For an unknown method or encoding, a density outside (0, 1] or a negative tau.
    """

    def __init__(self, config: CompressionConfig, num_params: int):
        if config.method not in METHODS:
            raise ValueError(f"unknown compression method {config.method!r}: use one of {METHODS}")
        if config.values not in VALUE_ENCODINGS:
            raise ValueError(f"unknown value encoding {config.values!r}: use one of "
                             f"{VALUE_ENCODINGS}")
        if config.method in ("topk", "randomk") and not 0.0 < config.density <= 1.0:
            raise ValueError(f"density must be in (0, 1] for {config.method}, got "
                             f"{config.density!r}")
        if config.method == "threshold" and not (math.isfinite(config.tau) and config.tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0, got {config.tau!r}")
        if not isinstance(num_params, (int, np.integer)) or num_params < 1:
            raise ValueError(f"num_params must be a positive integer, got {num_params!r}")
        self.config = config
        self.num_params = int(num_params)
        self.residual = np.zeros(self.num_params, np.float32) \
            if config.method in ("topk", "threshold") else None
        #: Whether the residual holds only noised (differentially private) values; a residual
        #: filled by a round with privacy off holds clean data and must not reach a DP round.
        self.residual_is_private = True

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def value_encoding(self) -> str:
        return self.config.values

    @property
    def k(self) -> int:
        """Coordinates kept by ``topk`` and ``randomk``: ``ceil(density * num_params)``."""
        return min(self.num_params, max(1, math.ceil(self.config.density * self.num_params)))

    @property
    def selects_from_data(self) -> bool:
        """Whether the kept indices depend on the update's values (``topk``, ``threshold``)."""
        return self.method in ("topk", "threshold")

    def randomk_indices(self, seed: int) -> np.ndarray:
        """The round's data-independent indices: sorted uint32, the same on every device."""
        return kernels.randomk(self.num_params, self.k, seed)

    def sparsify(self, x: np.ndarray, *, randomk_seed: int | None = None):
        """Select and quantize coordinates of ``x`` (float32, length ``num_params``).

        Returns
        -------
        indices : numpy.ndarray or None
            Sorted uint32 indices, or None for a dense update (method ``none``).
        values : numpy.ndarray
            float32 values as the chosen encoding will carry them.
        """
        x = self._check(x)
        if self.method == "none":
            return None, self.quantized(x.copy())
        if self.method == "randomk":
            if randomk_seed is None:
                raise ValueError("random-k needs the round's randomk_seed from the server")
            idx = self.randomk_indices(randomk_seed)
            return idx, self.quantized(x[idx])
        if self.method == "topk":
            idx, vals = kernels.topk_ef_(self.residual, x, self.k)
        else:
            self.residual += x
            idx, vals = kernels.threshold_select(self.residual, self.config.tau)
            self.residual[idx] = 0.0
        sent = self.quantized(vals)
        # Error feedback of the rounding too: what the wire does not carry stays for next time.
        self.residual[idx] += vals - sent
        return idx, sent

    def forget_residual(self) -> None:
        """Drop what error feedback held back (it is lost, not sent)."""
        if self.residual is not None:
            self.residual[:] = 0.0
        self.residual_is_private = True

    def quantized(self, values: np.ndarray) -> np.ndarray:
        """``values`` rounded to the value encoding (float32; a no-op for f32)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.value_encoding == "f32" or values.size == 0:
            return values
        if self.value_encoding == "f16" and np.abs(values).max() >= F16_OVERFLOW:
            raise ValueError(f"a value of magnitude {np.abs(values).max():g} does not fit f16 "
                             f"(largest 65504): use f32 or int8, or clip the update")
        buf, scale = kernels.quantize(values, self.value_encoding)
        return kernels.dequantize(buf, self.value_encoding, values.size, scale)

    def _check(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (self.num_params,):
            raise ValueError(f"expected a float32 update of shape ({self.num_params},), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} "
                             f"{getattr(x, 'shape', '')}")
        return np.ascontiguousarray(x)
