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
from edgefl.device.privacy import PrivacyAccountant, PrivacyPolicy
from edgefl.wire import Update
from edgefl.wire.protocol import RoundAnnouncement


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


class DeviceUpdates:
    """Turn each round's training result into the :class:`~edgefl.wire.Update` a device sends.

    The one code path from a training delta to an update, used by
    :class:`edgefl.device.client.EdgeClient` and by in-memory simulations alike. It keeps one
    :class:`Compressor` (and its error-feedback residual) per compression and privacy setting.

    Parameters
    ----------
    client_id : str
    accountant : PrivacyAccountant
        The device's budget.
    noise_rng : numpy.random.Generator
        Source of the float privacy noise (fresh OS entropy on a real device).
    """

    def __init__(self, client_id: str, accountant: PrivacyAccountant,
                 noise_rng: np.random.Generator):
        self.client_id = client_id
        self.accountant = accountant
        self.noise_rng = noise_rng
        self._compressors: dict[tuple, Compressor] = {}

    def update(self, announcement: RoundAnnouncement, delta: np.ndarray, num_samples: int,
               update_id: int) -> Update:
        """The update for ``announcement``'s round from a training ``delta`` on ``num_samples``.

        Raises
        ------
        PrivacyBudgetExhausted
            Before any work, when the budget cannot pay for this update.
        """
        a, num_params = announcement, int(delta.size)
        key = (a.config.compression, a.config.privacy, num_params)
        compressor = self._compressors.get(key)
        if compressor is None:
            compressor = self._compressors[key] = Compressor(a.config.compression, num_params)
        policy = PrivacyPolicy(a.config.privacy, self.accountant)
        indices, values = UpdatePipeline(policy, compressor).run(
            delta, rng=self.noise_rng, randomk_seed=a.randomk_seed)
        return Update(self.client_id, a.round_id, a.model_version, update_id, num_samples,
                      num_params, indices, values, compressor.value_encoding)
