"""Differential privacy of a device's updates: clipping, calibrated noise, and a budget.

Mechanisms (announced by the server in each round, :class:`edgefl.wire.protocol.PrivacyConfig`)
-----------------------------------------------------------------------------------------------
Local mechanisms protect a device's update against whoever sees it (the server, and the broker
until updates are sealed). Their unit of privacy is one device's data in one round, under
**replace-one adjacency**: the update computed from this device's data against the one from any
other data it could have held. Two clipped updates differ by up to ``2C`` (both have norm at most
``C``), so the noise is calibrated to sensitivity ``2C`` and the epsilon stated is the replace-one
epsilon:

* ``laplace``: L1 clip to ``C``, Laplace(0, b) per coordinate with ``b = 2C / epsilon``.
  (An L2 clip would bound the L1 sensitivity only by ``sqrt(d) * C``, so Laplace goes with L1.)
  The noise is sampled in floating point, attackable in theory (Mironov, CCS 2012).
* ``discrete-laplace``: the secure variant of ``laplace`` (:mod:`edgefl.device.secure_noise`): the
  same L1 clip and scale, on a power-of-two grid, discrete noise from a ChaCha20 keystream.
* ``gaussian``: L2 clip to ``C``, N(0, sigma^2) per coordinate with sigma from the *analytic*
  Gaussian mechanism (Balle & Wang, ICML 2018) for sensitivity ``2C``: the smallest sigma with
  ``Phi(D/(2 sigma) - eps sigma/D) - e^eps Phi(-D/(2 sigma) - eps sigma/D) <= delta``, ``D = 2C``.

Local DP on a whole-model update learns nothing with a realistic number of devices (noise per
coordinate of order ``C / epsilon``, signal of order ``C / d``); the server warns when a run is in
that regime. The useful private mode is central:

* ``central-gaussian`` (DP-FedAvg, McMahan et al. 2018): the device clips its update in L2 to
  ``C`` and adds no noise; the server adds Gaussian noise to the sum and accounts the privacy of
  the whole run for one device's data (add/remove adjacency) with its RDP accountant
  (``edgefl_server.accounting``). The device trusts the aggregator with its clipped update; it
  spends nothing from its own budget for it.

Budget
------
Accounting of local mechanisms is **basic composition**: a device that sends updates with epsilons
``e1, e2, ...`` and deltas ``d1, d2, ...`` has spent ``sum(e_i)`` and ``sum(d_i)``, and sends no
update that would take either sum over its budget. It is loose (RDP accounting would allow more
rounds) but never wrong. The accountant persists what was spent, atomically, so a device that
reboots does not get its budget back.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np

from edgefl import kernels
from edgefl.durable import replace_file
from edgefl.wire.calibration import MAX_GAUSSIAN_EPSILON, local_noise_scale
from edgefl.wire.protocol import LOCAL_MECHANISMS, PrivacyConfig
from edgefl.device.secure_noise import ChaChaUniforms, add_discrete_laplace_

#: What the budget file, the device's status and its stats say the epsilon means.
LOCAL_GUARANTEE = {"adjacency": "replace-one", "composition": "basic", "unit": "device, per round"}

class PrivacyBudgetExhausted(RuntimeError):
    """The device's privacy budget cannot pay for another update; it sends no more."""


class PrivacyAccountant:
    """The epsilon and delta a device has spent (basic composition), against its total budget.

    Parameters
    ----------
    budget : float
        Total replace-one epsilon the device may ever spend (> 0).
    delta_budget : float
        Total delta it may ever spend (Gaussian rounds spend their delta; Laplace rounds none).
    path : str or os.PathLike, optional
        A JSON file keeping what was spent. Loaded if it exists, rewritten atomically (temporary
        file, fsync, rename) on every charge, so a crash leaves either the old or the new value.
        Without a path, spending is forgotten at exit: only for tests and simulations.

    Raises
    ------
    ValueError
        If the file exists but cannot be read as an accountant's state; a budget is never reset
        silently.
    """

    def __init__(self, budget: float, *, delta_budget: float = 1e-5,
                 path: str | os.PathLike | None = None):
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"privacy budget must be a positive finite epsilon, got {budget!r}")
        if not (isinstance(delta_budget, (int, float)) and 0 <= delta_budget < 1):
            raise ValueError(f"delta budget must be in [0, 1), got {delta_budget!r}")
        self.budget = float(budget)
        self.delta_budget = float(delta_budget)
        self.path = Path(path) if path is not None else None
        self.spent_epsilon = 0.0
        self.spent_delta = 0.0
        self.updates = 0
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            spent_epsilon, spent_delta = float(state["spent_epsilon"]), float(state["spent_delta"])
            updates = int(state["updates"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"privacy accountant file {self.path} is unreadable ({exc}); it must "
                             "not be reset silently: restore it, or delete it only if this device "
                             "never sent a private update") from None
        if not (math.isfinite(spent_epsilon) and spent_epsilon >= 0 and spent_delta >= 0):
            raise ValueError(f"privacy accountant file {self.path} holds invalid spending "
                             f"{spent_epsilon!r}")
        if "adjacency" not in state and updates:
            # Written before epsilon meant replace-one: those updates were noised for
            # sensitivity C, which under replace-one (sensitivity 2C) is group privacy of two:
            # (2 epsilon, (1 + e^epsilon) delta) each.
            spent_delta *= 1.0 + math.exp(min(spent_epsilon, 700.0))
            spent_epsilon *= 2.0
        self.spent_epsilon, self.spent_delta, self.updates = spent_epsilon, spent_delta, updates

    @property
    def remaining(self) -> float:
        """Epsilon still available."""
        return max(0.0, self.budget - self.spent_epsilon)

    @property
    def remaining_delta(self) -> float:
        """Delta still available."""
        return max(0.0, self.delta_budget - self.spent_delta)

    def can_spend(self, epsilon: float, delta: float = 0.0) -> bool:
        """Whether one more update of ``(epsilon, delta)`` fits both budgets (1e-9 tolerance for
        rounding)."""
        return (self.spent_epsilon + epsilon <= self.budget * (1 + 1e-9)
                and self.spent_delta + delta <= self.delta_budget * (1 + 1e-9))

    def check(self, epsilon: float, delta: float = 0.0) -> None:
        """Raise :class:`PrivacyBudgetExhausted` unless an update of ``(epsilon, delta)`` fits."""
        if not self.can_spend(epsilon, delta):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: {self.updates} updates spent epsilon "
                f"{self.spent_epsilon:.6g} of the budget {self.budget:.6g} and delta "
                f"{self.spent_delta:.3g} of {self.delta_budget:.3g} (replace-one, basic "
                f"composition), and the next update needs epsilon {epsilon:.6g}, delta "
                f"{delta:.3g}; this device sends no more private updates")

    def charge(self, epsilon: float, delta: float = 0.0) -> None:
        """Record one update (basic composition) and persist it before returning."""
        with self._lock:
            self.check(epsilon, delta)
            self.spent_epsilon += epsilon
            self.spent_delta += delta
            self.updates += 1
            if self.path is not None:
                self._save()

    def _save(self) -> None:
        state = json.dumps({"spent_epsilon": self.spent_epsilon, "spent_delta": self.spent_delta,
                            "updates": self.updates, "budget": self.budget,
                            "delta_budget": self.delta_budget, **LOCAL_GUARANTEE})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, state.encode())


class PrivacyPolicy:
    """One round's privacy mechanism, paid for from a device's :class:`PrivacyAccountant`.

    Parameters
    ----------
    config : edgefl.wire.protocol.PrivacyConfig
        The round's mechanism (see the module docstring), epsilon, delta and clip bound.
    accountant : PrivacyAccountant
        The device's budget; may be None with mechanisms "none" and "central-gaussian", which
        spend nothing from it.
    uniforms : edgefl.device.secure_noise.ChaChaUniforms, optional
        The keystream of ``discrete-laplace``; a fresh one (OS key) by default.

    Raises
    ------
    ValueError
        For an unknown mechanism or an epsilon, delta or clip bound out of range.
    """

    def __init__(self, config: PrivacyConfig, accountant: PrivacyAccountant | None,
                 uniforms: ChaChaUniforms | None = None):
        self.config = config
        self.accountant = accountant
        self.mechanism = config.mechanism
        self.scale = 0.0
        if self.mechanism == "none":
            return
        if self.mechanism not in ("central-gaussian",) + LOCAL_MECHANISMS:
            raise ValueError(f"unknown privacy mechanism {self.mechanism!r}: use 'none', "
                             f"'central-gaussian' or one of {', '.join(LOCAL_MECHANISMS)}")
        clip = config.clip
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip bound must be positive and finite, got {clip!r}")
        if self.mechanism == "central-gaussian":
            return  # the server adds the noise
        if accountant is None:
            raise ValueError(f"mechanism {self.mechanism!r} needs a PrivacyAccountant with the "
                             "device's budget")
        eps = config.epsilon
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"epsilon must be positive and finite, got {eps!r}")
        if self.mechanism == "gaussian":
            if not 0.0 < config.delta < 1.0:
                raise ValueError(f"gaussian mechanism needs 0 < delta < 1, got {config.delta!r}")
            if eps > MAX_GAUSSIAN_EPSILON:
                raise ValueError(f"gaussian epsilon {eps} exceeds {MAX_GAUSSIAN_EPSILON}")
        if self.mechanism == "discrete-laplace":
            self._uniforms = uniforms if uniforms is not None else ChaChaUniforms()
        # Replace-one sensitivity: two clipped updates differ by up to 2C.
        self.scale = local_noise_scale(config)

    @property
    def enabled(self) -> bool:
        """Whether updates are clipped (mechanism other than "none")."""
        return self.mechanism != "none"

    @property
    def local(self) -> bool:
        """Whether the device adds the noise and pays for it from its own budget."""
        return self.mechanism in LOCAL_MECHANISMS

    @property
    def epsilon(self) -> float:
        """Replace-one epsilon one update costs the device (0 unless a local mechanism)."""
        return self.config.epsilon if self.local else 0.0

    @property
    def delta(self) -> float:
        """Delta one update costs the device (0 unless local Gaussian)."""
        return self.config.delta if self.mechanism == "gaussian" else 0.0

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExhausted` if the budget cannot pay for one more update."""
        if self.local:
            self.accountant.check(self.epsilon, self.delta)

    def clip_(self, x: np.ndarray) -> float:
        """Clip ``x`` in place to the mechanism's norm (L1 for Laplace, L2 for Gaussian); return
        the norm before clipping."""
        if self.mechanism in ("laplace", "discrete-laplace"):
            return kernels.clip_l1_(x, self.config.clip)
        if self.mechanism in ("gaussian", "central-gaussian"):
            return kernels.clip_l2_(x, self.config.clip)
        raise ValueError("privacy mechanism 'none' does not clip")

    def noise_(self, x: np.ndarray, rng: np.random.Generator) -> None:
        """Add the calibrated noise to ``x`` in place (scale :attr:`scale` per coordinate).

        ``rng`` feeds the float samplers; ``discrete-laplace`` draws from its ChaCha20 keystream
        instead, and ``central-gaussian`` adds nothing (the server does).
        """
        if self.mechanism == "laplace":
            kernels.laplace_(x, self.scale, rng)
        elif self.mechanism == "discrete-laplace":
            add_discrete_laplace_(x, self.scale, self._uniforms)
        elif self.mechanism == "gaussian":
            kernels.gaussian_(x, self.scale, rng)
        elif self.mechanism != "central-gaussian":
            raise ValueError("privacy mechanism 'none' adds no noise")

    def charge(self) -> None:
        """Pay for one update from the accountant (persisted before returning)."""
        if self.local:
            self.accountant.charge(self.epsilon, self.delta)
