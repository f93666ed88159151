"""What one simulated federation runs: :class:`SimulationPlan` and the default training."""
from __future__ import annotations

from dataclasses import dataclass, field

from edgefl.wire.protocol import CompressionConfig, TrainingConfig

#: What ``edgefl simulate`` announces unless told otherwise: a few local epochs with momentum, and
#: top-k 10% updates in f16 so that the byte comparison with dense float32 means something.
SIMULATION_TRAINING = TrainingConfig(
    epochs=5, batch_size=16, lr=0.1, momentum=0.9,
    compression=CompressionConfig("topk", density=0.1, values="f16"))



@dataclass
class SimulationPlan:
    """One simulated federation on the digits task."""

    devices: int = 10
    rounds: int = 30
    strategy: str = "fedavg"
    strategy_options: dict = field(default_factory=dict)
    training: object = None  # TrainingConfig; built by the caller
    seed: int = 0
    alpha: float = 0.5
    round_timeout: float = 30.0
    predict_rate: float = 50.0
    privacy_budget: float = 1000.0
    fleet: str = "sim"
    devices_as: str = "processes"  # or "threads" (in-process EdgeClients, for quick benchmarks)

