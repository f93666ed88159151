"""FedOpt: a server optimizer stepping on the mean client delta, the base of FedAdam/Yogi/Adagrad.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2. The mean client delta ``Delta_t`` is treated as a
pseudo-gradient; the server keeps a first moment ``m`` and a second moment ``v`` and steps

    m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t
    v_t     = (subclass rule)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau**2`` as in the paper (no bias correction, also as in the
paper). ``Delta_t`` is FedAvg's sample-weighted mean, as in Flower's implementation. The
hyperparameter names are Flower's: eta (server learning rate), eta_l (client learning rate,
announced as ``TrainingConfig.lr``; None keeps the server's configured lr), beta_1, beta_2, tau.
The moments persist with the server state, so a restarted server continues the same trajectory.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from edgefl.wire.protocol import TrainingConfig

from .aggregate import adaptive_step, first_moment
from .fedavg import FedAvg
from .strategy import check_range


class FedOpt(FedAvg):
    """Server-side adaptive optimizer over FedAvg's mean delta; subclasses define :meth:`second_moment`."""

    name = ""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options(FedAvg.Options):
        """Server optimizer hyperparameters (Flower's names; see the module docstring)."""

        eta: float = 1e-2
        eta_l: float | None = None
        beta_1: float = 0.9
        beta_2: float = 0.99
        tau: float = 1e-3

        def __post_init__(self):
            check_range("eta", self.eta, 0.0, 1e3, lo_open=True)
            if self.eta_l is not None:
                check_range("eta_l", self.eta_l, 0.0, 1e6, lo_open=True)
            check_range("beta_1", self.beta_1, 0.0, 1.0, hi_open=True)
            check_range("beta_2", self.beta_2, 0.0, 1.0, hi_open=True)
            check_range("tau", self.tau, 0.0, 1e3, lo_open=True)

    def __init__(self, **options):
        super().__init__(**options)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def configure_training(self, config: TrainingConfig) -> TrainingConfig:
        if self.options.eta_l is None:
            return config
        return dataclasses.replace(config, lr=float(self.options.eta_l))

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """``v_t`` from ``v_{t-1}`` and the mean delta ``Delta_t`` (float64 arrays)."""
        raise NotImplementedError

    def aggregate(self, weights, updates):
        delta = self.mean_delta(weights, updates)
        if delta is None:
            return None
        opts = self.options
        delta = delta.astype(np.float64)
        if self.m is None or self.m.shape != delta.shape:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, opts.tau**2)
        self.m = first_moment(self.m, delta, opts.beta_1)
        self.v = self.second_moment(self.v, delta)
        return adaptive_step(weights, self.m, self.v, eta=opts.eta, tau=opts.tau)

    def state_dict(self):
        return {} if self.m is None else {"m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, state):
        if not state:
            self.m = self.v = None
            return
        if set(state) != {"m", "v"} or state["m"].shape != state["v"].shape:
            raise ValueError(
                f"strategy {self.name!r}: saved optimizer state has {sorted(state)}, expected "
                "m and v of one shape; the state directory was written by another strategy"
            )
        self.m = np.asarray(state["m"], dtype=np.float64).copy()
        self.v = np.asarray(state["v"], dtype=np.float64).copy()
