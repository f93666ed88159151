"""The baselines a simulated federation is compared to, computed in the same run.

* **centralised**: the same model, same initial weights, trained on all training data in one
  place, one epoch per round;
* **dense FedAvg**: the same devices and rounds, in memory, with dense un-noised updates,
  aggregated by the server's own strategy.
"""
from __future__ import annotations

from dataclasses import replace

from edgefl.device.trainer import LocalTrainer
from edgefl.simulation.plan import SimulationPlan
from edgefl.simulation.task import Task
from edgefl.wire import Update
from edgefl.wire.protocol import CompressionConfig, PrivacyConfig
from edgefl_server.strategies import make_strategy

def centralised_accuracy(plan: SimulationPlan, task: Task) -> list[float]:
    """Accuracy after each of ``plan.rounds`` epochs of training the same model on all data."""
    model, evaluate = task.model, task.evaluator()
    trainer = LocalTrainer(model.manifest, capacity=len(task.y_train), seed=plan.seed,
                           featurizer=task.featurizer)
    trainer.add(task.X_train, task.y_train)
    config = replace(plan.training, epochs=1, mu=0.0)
    weights = model.weights.copy()
    out = []
    for _ in range(plan.rounds):
        weights = weights + trainer.train(weights, config).delta
        out.append(evaluate(model.with_weights(weights, version=0, round_id=0))["accuracy"])
    return out


def in_memory_accuracy(plan: SimulationPlan, task: Task, *, strategy: str = "fedavg",
                       options: dict | None = None) -> list[float]:
    """Accuracy per round of dense, un-noised federated training of the same devices, in memory.

    Every device trains on its partition each round with ``plan.training`` (compression and
    privacy off, adjusted by the strategy as the server would) and the server's own strategy
    aggregates: the reference a run over MQTT with compression or privacy is compared to.
    """
    model, evaluate = task.model, task.evaluator()
    trainers = []
    for part in task.parts:
        trainer = LocalTrainer(model.manifest, capacity=len(part), seed=plan.seed,
                               featurizer=task.featurizer)
        trainer.add(task.X_train[part], task.y_train[part])
        trainers.append(trainer)
    aggregator = make_strategy(strategy, options)
    config = aggregator.configure_training(
        replace(plan.training, privacy=PrivacyConfig(), compression=CompressionConfig()))
    weights, n = model.weights.copy(), model.manifest.num_params
    out = []
    for round_id in range(1, plan.rounds + 1):
        updates = []
        for i, trainer in enumerate(trainers):
            result = trainer.train(weights, config)
            updates.append(Update(f"dev-{i:02d}", round_id, round_id - 1, i, result.num_samples, n,
                                  None, result.delta))
        weights = aggregator.aggregate(weights, updates)
        out.append(evaluate(model.with_weights(weights, version=0, round_id=0))["accuracy"])
    return out

