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
    """One simulated federation: the digits task, or the user's ``model`` and ``data`` files.

    ``partition`` is a parsed ``--partition`` (:func:`edgefl.simulation.task.partition_option`);
    None means Dirichlet(``alpha``).
    """

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
    central_privacy: object = None  # edgefl_server.accounting.CentralPrivacy, or None
    fleet: str = "sim"
    devices_as: str = "processes"  # or "threads" (in-process EdgeClients, for quick benchmarks)
    partition: tuple | None = None
    model: str | None = None
    data: str | None = None
    label_column: str = "label"
    trainable_layers: int | None = None

    @property
    def partition_spec(self) -> tuple:
        """The partition as ``(kind, value)``: ``("dirichlet", alpha)`` unless told otherwise."""
        return self.partition or ("dirichlet", self.alpha)


def partition_text(partition) -> str:
    """``IID``, ``Dirichlet(0.5) non-IID`` or ``by column 'site'`` for a parsed partition."""
    kind, value = partition
    if kind == "dirichlet":
        return f"Dirichlet({value:g}) non-IID"
    return "IID" if kind == "iid" else f"by column {value!r}"
