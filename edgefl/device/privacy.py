"""Differential privacy of a device's updates: clipping, calibrated noise, and a budget.

What is guaranteed
------------------
The unit of privacy is one device's update in one round. Its update is clipped to norm ``C``
(L1 for Laplace, L2 for Gaussian), so adding or removing one device's update changes what the
server can sum by a vector of that norm at most (sensitivity ``C``), and noise is calibrated to
``C``:

* ``laplace``: L1 clip, Laplace(0, b) per coordinate with ``b = C / epsilon`` -> epsilon-DP.
  (An L2 clip would bound the L1 sensitivity only by ``sqrt(d) * C``, so Laplace always goes with
  the L1 clip.)
* ``gaussian``: L2 clip, N(0, sigma^2) per coordinate with sigma from the *analytic* Gaussian
  mechanism (Balle & Wang, ICML 2018): the smallest sigma for which the privacy loss satisfies
  ``Phi(C/(2 sigma) - eps sigma/C) - e^eps Phi(-C/(2 sigma) - eps sigma/C) <= delta``. It is exact
  for every epsilon > 0, unlike the classic ``sigma = C sqrt(2 ln(1.25/delta)) / epsilon``, which is
  proven only for epsilon < 1 and is larger than needed (see :func:`classic_gaussian_sigma`).

Against a server that sees a single device's update and asks whether that device's data was
replaced by other data (local DP under substitution), two clipped updates differ by up to ``2C``,
so the same noise gives ``2 epsilon`` (and for Gaussian the guarantee of sensitivity ``2C``).

Accounting is basic composition: a device that sends updates with epsilons ``e1, e2, ...``
(and deltas ``d1, d2, ...``) has spent ``sum(e_i)`` (and ``sum(d_i)``). It is loose (advanced or
RDP accounting would allow more rounds) but simple and never wrong. The accountant persists what
was spent, atomically, so a device that reboots does not get its budget back.

Known limit: noise is sampled in floating point, which is attackable in theory (Mironov, CCS
2012: the low bits of a float Laplace sample can reveal the unnoised value). The fix, a secure mode
with a CSPRNG seed and snapping to a power-of-two grid (or discrete Laplace), is not implemented.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgefl import kernels
from edgefl.wire.protocol import PrivacyConfig

#: Above this epsilon, e^epsilon overflows the analytic Gaussian calibration (and protects nothing).
MAX_GAUSSIAN_EPSILON = 500.0


class PrivacyBudgetExhausted(RuntimeError):
    """The device's privacy budget cannot pay for another update; it sends no more."""


def classic_gaussian_sigma(clip: float, epsilon: float, delta: float) -> float:
    """``C * sqrt(2 ln(1.25 / delta)) / epsilon`` (Dwork & Roth, Thm. A.1; valid for epsilon < 1).

    For comparison only: the policy uses :func:`analytic_gaussian_sigma`, which is never larger.
    """
    return clip * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def _phi(t: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def analytic_gaussian_delta(sigma: float, clip: float, epsilon: float) -> float:
    """The smallest delta for which N(0, sigma^2) noise on an L2-sensitivity-``clip`` query is
    (epsilon, delta)-DP (Balle & Wang 2018, Theorem 8)."""
    a, b = clip / (2.0 * sigma), epsilon * sigma / clip
    tail = _phi(-a - b)
    return _phi(a - b) - (math.exp(epsilon) * tail if tail > 0.0 else 0.0)


def analytic_gaussian_sigma(clip: float, epsilon: float, delta: float) -> float:
    """The smallest sigma (to 1e-12 relative) making the Gaussian mechanism (epsilon, delta)-DP.

    Bisection on :func:`analytic_gaussian_delta`, which decreases in sigma; the upper end of the
    final bracket is returned, so the result always satisfies the bound.
    """
    hi = clip
    while analytic_gaussian_delta(hi, clip, epsilon) > delta:
        hi *= 2.0
    lo = hi
    while analytic_gaussian_delta(lo, clip, epsilon) <= delta and lo > clip * 1e-12:
        lo /= 2.0
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(mid, clip, epsilon) > delta:
            lo = mid
        else:
            hi = mid
    return hi


class PrivacyAccountant:
    """The epsilon (and delta) a device has spent, against its total budget.

    Parameters
    ----------
    budget : float
        Total epsilon the device may ever spend (> 0).
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

    def __init__(self, budget: float, *, path: str | os.PathLike | None = None):
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"privacy budget must be a positive finite epsilon, got {budget!r}")
        self.budget = float(budget)
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
        self.spent_epsilon, self.spent_delta, self.updates = spent_epsilon, spent_delta, updates

    @property
    def remaining(self) -> float:
        """Epsilon still available."""
        return max(0.0, self.budget - self.spent_epsilon)

    def can_spend(self, epsilon: float) -> bool:
        """Whether one more update of ``epsilon`` fits the budget (1e-9 tolerance for rounding)."""
        return self.spent_epsilon + epsilon <= self.budget * (1 + 1e-9)

    def check(self, epsilon: float) -> None:
        """Raise :class:`PrivacyBudgetExhausted` unless an update of ``epsilon`` fits."""
        if not self.can_spend(epsilon):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: {self.updates} updates spent epsilon "
                f"{self.spent_epsilon:.6g} of the budget {self.budget:.6g}, and the next update "
                f"needs {epsilon:.6g}; this device sends no more private updates")

    def charge(self, epsilon: float, delta: float = 0.0) -> None:
        """Record one update (basic composition) and persist it before returning."""
        with self._lock:
            self.check(epsilon)
            self.spent_epsilon += epsilon
            self.spent_delta += delta
            self.updates += 1
            if self.path is not None:
                self._save()

    def _save(self) -> None:
        state = json.dumps({"spent_epsilon": self.spent_epsilon, "spent_delta": self.spent_delta,
                            "updates": self.updates, "budget": self.budget})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(state)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


class PrivacyPolicy:
    """One round's privacy mechanism, paid for from a device's :class:`PrivacyAccountant`.

    Parameters
    ----------
    config : edgefl.wire.protocol.PrivacyConfig
        The round's mechanism ("none", "laplace" or "gaussian"), epsilon, delta and clip bound.
    accountant : PrivacyAccountant
        The device's budget; may be None only with mechanism "none".

    Raises
    ------
    ValueError
        For an unknown mechanism or an epsilon, delta or clip bound out of range.
    """

    def __init__(self, config: PrivacyConfig, accountant: PrivacyAccountant | None):
        self.config = config
        self.accountant = accountant
        self.mechanism = config.mechanism
        if self.mechanism == "none":
            self.scale = 0.0
            return
        if self.mechanism not in ("laplace", "gaussian"):
            raise ValueError(f"unknown privacy mechanism {self.mechanism!r}: use 'none', "
                             "'laplace' or 'gaussian'")
        if accountant is None:
            raise ValueError(f"mechanism {self.mechanism!r} needs a PrivacyAccountant with the "
                             "device's budget")
        eps, clip = config.epsilon, config.clip
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"epsilon must be positive and finite, got {eps!r}")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip bound must be positive and finite, got {clip!r}")
        if self.mechanism == "laplace":
            self.scale = clip / eps
        else:
            if not 0.0 < config.delta < 1.0:
                raise ValueError(f"gaussian mechanism needs 0 < delta < 1, got {config.delta!r}")
            if eps > MAX_GAUSSIAN_EPSILON:
                raise ValueError(f"gaussian epsilon {eps} exceeds {MAX_GAUSSIAN_EPSILON}")
            self.scale = analytic_gaussian_sigma(clip, eps, config.delta)

    @property
    def enabled(self) -> bool:
        """Whether updates are clipped and noised (mechanism other than "none")."""
        return self.mechanism != "none"

    @property
    def epsilon(self) -> float:
        """Epsilon one update costs (0 when disabled)."""
        return self.config.epsilon if self.enabled else 0.0

    @property
    def delta(self) -> float:
        """Delta one update costs (0 for Laplace and when disabled)."""
        return self.config.delta if self.mechanism == "gaussian" else 0.0

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExhausted` if the budget cannot pay for one more update."""
        if self.enabled:
            self.accountant.check(self.epsilon)

    def clip_(self, x: np.ndarray) -> float:
        """Clip ``x`` in place to the mechanism's norm (L1 Laplace, L2 Gaussian); return the
        norm before clipping."""
        if self.mechanism == "laplace":
            return kernels.clip_l1_(x, self.config.clip)
        if self.mechanism == "gaussian":
            return kernels.clip_l2_(x, self.config.clip)
        raise ValueError("privacy mechanism 'none' does not clip")

    def noise_(self, x: np.ndarray, rng: np.random.Generator) -> None:
        """Add the calibrated noise to ``x`` in place (scale :attr:`scale` per coordinate)."""
        if self.mechanism == "laplace":
            kernels.laplace_(x, self.scale, rng)
        elif self.mechanism == "gaussian":
            kernels.gaussian_(x, self.scale, rng)
        else:
            raise ValueError("privacy mechanism 'none' adds no noise")

    def charge(self) -> None:
        """Pay for one update from the accountant (persisted before returning)."""
        if self.enabled:
            self.accountant.charge(self.epsilon, self.delta)
