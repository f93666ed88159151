"""The one place that turns a training delta into what a device sends, in the order that keeps
the privacy guarantee (see :mod:`edgefl.device.privacy` for the guarantee itself).

With differential privacy on:

* ``none``, ``topk``, ``threshold``: clip the *dense* delta, add noise to every coordinate, then
  sparsify. Top-k and threshold then choose indices from the noised vector only, which is
  post-processing of a DP output and costs no privacy; their error-feedback residual holds noised
  values only, so later rounds stay post-processing too. A residual left by a round with privacy
  off holds clean values: it is dropped before the first private round.
* ``randomk``: the indices come from the round's server seed, independent of the data. Only those
  ``k`` values are clipped (to the same norm ``C``) and noised. Sensitivity argument: the index set
  is public and fixed before the data is looked at, so the released vector is the clipped
  sub-vector (norm at most ``C``, the same bound as the dense case) plus calibrated noise; the
  mechanism on those ``k`` coordinates is epsilon-DP, and the unsent coordinates are never
  released. It also noises ``k`` instead of ``n`` coordinates.

With privacy off, top-k and threshold select on the clean delta: the indices then reveal which
coordinates of this device's update moved most. That is allowed only because nothing is promised.

The budget is checked before any work and charged once, when the noised update is produced;
resending the same encoded update (after a lost acknowledgement) releases nothing new.
"""
from __future__ import annotations

import numpy as np

from edgefl.device.compression import Compressor
from edgefl.device.privacy import PrivacyPolicy


class UpdatePipeline:
    """Clip, noise, sparsify and quantize one round's delta.

    Parameters
    ----------
    policy : PrivacyPolicy
        The round's privacy mechanism and the device's budget.
    compressor : Compressor
        Kept across rounds by the caller, so its error-feedback residual persists.
    """

    def __init__(self, policy: PrivacyPolicy, compressor: Compressor):
        self.policy = policy
        self.compressor = compressor

    def run(self, delta: np.ndarray, *, rng: np.random.Generator, randomk_seed: int | None = None):
        """Produce the update to send for ``delta`` (local minus global weights).

        Parameters
        ----------
        delta : numpy.ndarray
            float32 of length ``compressor.num_params``; not modified.
        rng : numpy.random.Generator
            Source of the privacy noise.
        randomk_seed : int, optional
            The round's server seed; required by ``randomk``.

        Returns
        -------
        indices : numpy.ndarray or None
            Sorted uint32 indices, or None for a dense update.
        values : numpy.ndarray
            float32 values, already rounded to the value encoding.

        Raises
        ------
        PrivacyBudgetExhausted
            Before any work, when the budget cannot pay for this update.
        """
        self.policy.check_budget()
        x = np.array(delta, dtype=np.float32, copy=True)
        if x.shape != (self.compressor.num_params,):
            raise ValueError(f"delta has shape {x.shape}, expected ({self.compressor.num_params},)")
        if not np.isfinite(x).all():
            raise ValueError("delta contains NaN or Inf: training diverged; nothing was sent or "
                             "charged")
        if not self.policy.enabled:
            self.compressor.residual_is_private = self.compressor.residual is None
            return self.compressor.sparsify(x, randomk_seed=randomk_seed)
        if not self.compressor.residual_is_private:
            # Clean values held back in a round with privacy off would leave in this DP update
            # with noise calibrated for a clipped vector they were never part of.
            self.compressor.forget_residual()
        if self.compressor.method == "randomk":
            if randomk_seed is None:
                raise ValueError("random-k needs the round's randomk_seed from the server")
            indices = self.compressor.randomk_indices(randomk_seed)
            kept = np.ascontiguousarray(x[indices])
            self.policy.clip_(kept)
            self.policy.noise_(kept, rng)
            result = indices, self.compressor.quantized(kept)
        else:
            self.policy.clip_(x)
            self.policy.noise_(x, rng)
            result = self.compressor.sparsify(x)
        self.policy.charge()
        return result
