"""A federation in memory: the devices' and the server's own code, without broker or storage.

For benchmarks with thousands of devices (``benchmarks/bench_privacy.py``). Each round runs what a
real one does, minus MQTT and SQLite:

* the server selects devices (:func:`edgefl_server.rounds.poisson_select`, rate ``q``) and, with
  central DP, first asks its :class:`~edgefl_server.accounting.RunAccountant` whether the round
  fits the target;
* each selected device trains (:class:`~edgefl.device.trainer.LocalTrainer`), turns the delta into
  its update with :class:`~edgefl.device.update_pipeline.DeviceUpdates` (clip, noise, compress,
  charge its own budget) and encodes it (:func:`edgefl.wire.encode_update`); a device whose budget
  is spent sends nothing, as a real one would;
* the server decodes each update (:func:`edgefl.wire.decode_update`), aggregates with the
  strategy's :meth:`~edgefl_server.strategies.Strategy.aggregate_round` and charges the round to
  its accountant.

``tests/test_memory_fleet.py`` checks that a small run gives the model a run over Mosquitto gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from edgefl.device.privacy import PrivacyAccountant, PrivacyBudgetExhausted
from edgefl.wire.protocol import RoundAnnouncement, TrainingConfig
from edgefl.device.trainer import LocalTrainer
from edgefl.device.update_pipeline import DeviceUpdates
from edgefl.wire import decode_update, encode_update
from edgefl_server.accounting import RunAccountant
from edgefl_server.rounds import poisson_select
from edgefl_server.strategies import Strategy


@dataclass
class FleetHistory:
    """Per round: held-out accuracy, the run's epsilon so far, and who took part.

    ``epsilon`` is the central accountant's (user-level, add/remove, at its delta) for central
    DP, and the largest replace-one epsilon any device spent (basic composition) for local DP.
    """

    accuracy: list[float] = field(default_factory=list)
    epsilon: list[float] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    stopped: str = ""


class MemoryFleet:
    """Devices and a server in one process, running the same code paths as over MQTT.

    Parameters
    ----------
    model : edgefl.wire.model.Model
        The initial global model.
    device_data : list of (X, y)
        Each device's local samples.
    strategy : Strategy
        The server's strategy (:class:`~edgefl_server.strategies.DPFedAvg` for central DP).
    training : TrainingConfig
        What every round announces (its privacy config says the mechanism).
    sampling_rate : float
        ``q``: each device is selected in a round with this probability.
    accountant : RunAccountant, optional
        Central DP's accountant; the run stops before a round it cannot afford.
    privacy_budget, delta_budget : float
        Each device's local budget (replace-one epsilon and delta, basic composition).
    seed : int
        Seeds the devices' minibatch order, the selection and the devices' float noise (a
        simulation may be reproducible; a real device's noise is not).
    """

    def __init__(self, model, device_data, *, strategy: Strategy, training: TrainingConfig,
                 sampling_rate: float = 1.0, accountant: RunAccountant | None = None,
                 privacy_budget: float = math.inf, delta_budget: float = 1e-5, seed: int = 0):
        self.model = model
        self.weights = model.weights.copy()
        self.version = model.version
        self.strategy = strategy
        self.training = training
        self.sampling_rate = sampling_rate
        self.accountant = accountant
        seeds = np.random.SeedSequence(seed).spawn(len(device_data) + 1)
        self._select_rng = np.random.default_rng(seeds[-1])
        self.ids = [f"dev-{i:05d}" for i in range(len(device_data))]
        budget = privacy_budget if math.isfinite(privacy_budget) else 1e300
        self.trainers, self.devices = {}, {}
        for client, (X, y), s in zip(self.ids, device_data, seeds):
            trainer = LocalTrainer(model.manifest, capacity=max(1, len(y)), seed=seed)
            trainer.add(X, y)
            self.trainers[client] = trainer
            self.devices[client] = DeviceUpdates(
                client, PrivacyAccountant(budget, delta_budget=delta_budget),
                np.random.default_rng(s))
        self.round_id = 0

    def run_round(self) -> int | None:
        """One round; the number of updates aggregated, or None when the accountant refuses it."""
        if self.accountant is not None and not self.accountant.affords_round():
            return None
        self.round_id += 1
        selected = poisson_select(self.ids, self.sampling_rate, self._select_rng)
        announcement = RoundAnnouncement(self.round_id, self.version, math.inf,
                                         self.strategy.configure_training(self.training),
                                         selected, randomk_seed=self.round_id)
        n = self.weights.size
        updates = []
        for client in selected:
            result = self.trainers[client].train(self.weights, announcement.config)
            try:
                update = self.devices[client].update(announcement, result.delta,
                                                     result.num_samples, self.round_id)
            except PrivacyBudgetExhausted:
                continue
            updates.append(decode_update(encode_update(update), expected_params=n))
        new = self.strategy.aggregate_round(self.weights, updates,
                                            expected_clients=self.sampling_rate * len(self.ids))
        if new is not None:
            self.weights, self.version = new, self.version + 1
        if self.accountant is not None:
            self.accountant.charge_round()
        return len(updates)

    def epsilon(self) -> float:
        """The run's epsilon so far (see :class:`FleetHistory`)."""
        if self.accountant is not None:
            return self.accountant.epsilon()
        return max(d.accountant.spent_epsilon for d in self.devices.values())

    def run(self, rounds: int, evaluate) -> FleetHistory:
        """Up to ``rounds`` rounds, ``evaluate(weights) -> accuracy`` after each."""
        history = FleetHistory()
        for _ in range(rounds):
            answered = self.run_round()
            if answered is None:
                history.stopped = (f"the privacy target allows {self.round_id} round(s) "
                                   f"(epsilon {self.epsilon():.3g})")
                break
            history.accuracy.append(float(evaluate(self.weights)))
            history.epsilon.append(self.epsilon())
            history.participants.append(answered)
        return history


def central_training(training: TrainingConfig, clip: float) -> TrainingConfig:
    """``training`` announcing central DP: devices clip in L2 to ``clip`` and add no noise."""
    return replace(training, privacy=replace(training.privacy, mechanism="central-gaussian",
                                             clip=clip))
