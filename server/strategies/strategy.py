"""The interface every aggregation strategy implements, and its shared plumbing.

A strategy turns the updates accepted in one round into the next global weights. It may adjust the
training config the round announces (FedProx sets ``mu``, FedSGD forces one full-batch step), and
it may keep optimizer state between rounds, which the server persists with the model
(:meth:`Strategy.state_dict`). Returning None from :meth:`Strategy.aggregate` means "nothing usable
arrived": the server keeps the current model.

Each strategy declares its hyperparameters once, in a frozen keyword-only ``Options`` dataclass
that subclasses extend, so a constructor call ``FedAdam(eta=0.01)`` is validated in one place.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol, Sequence

import numpy as np

from edgefl.wire.protocol import CompressionConfig, TrainingConfig

from .aggregate import WeightedDelta


class ClientUpdate(Protocol):
    """What a strategy reads from an accepted update (:class:`edgefl.wire.Update` fits)."""

    indices: np.ndarray | None
    values: np.ndarray
    num_samples: int


class Strategy:
    """Base class: sample-weighted deltas in, new flat float32 weights (or None) out.

    Parameters
    ----------
    **options
        Fields of the class's :class:`Options`; keyword-only by construction.

    Raises
    ------
    ValueError
        For an option the strategy does not have, or a value out of its range.
    """

    #: Registry name, as given to ``edgefl server --strategy``.
    name: ClassVar[str] = ""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options:
        """No hyperparameters."""

    def __init__(self, **options):
        known = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"strategy {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(known) or '(none)'}"
            )
        try:
            self.options = self.Options(**options)
        except ValueError as exc:
            raise ValueError(f"strategy {self.name!r}: {exc}") from None

    def configure_training(self, config: TrainingConfig) -> TrainingConfig:
        """The training config to announce for a round, given the server's base config."""
        return config

    def compression_warning(self, compression: CompressionConfig) -> str | None:
        """Why this strategy and the devices' ``compression`` are a poor pair, or None.

        The server logs it when it starts (robust rules under data-dependent sparsification).
        """
        return None

    def aggregate(self, weights: np.ndarray, updates: Sequence[ClientUpdate]) -> np.ndarray | None:
        """The next global weights from this round's accepted updates, or None to keep ``weights``."""
        raise NotImplementedError

    def aggregate_round(self, weights: np.ndarray, updates: Sequence[ClientUpdate], *,
                        expected_clients: float) -> np.ndarray | None:
        """What the server calls when a round closes: :meth:`aggregate`, or None (keep the
        model) when nothing arrived. ``expected_clients`` is the round's expected number of
        participants, which only a fixed-denominator strategy (:class:`DPFedAvg`) uses."""
        return self.aggregate(weights, updates) if updates else None

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state to persist between rounds (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (after a server restart)."""
        if state:
            raise ValueError(
                f"strategy {self.name!r} keeps no state, but the saved state has "
                f"{sorted(state)}: the state directory was written by another strategy"
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"{type(self).__name__}({opts})"


def weighted_deltas(updates: Sequence[ClientUpdate]) -> list[WeightedDelta]:
    """Each update's delta weighted by its sample count."""
    return [WeightedDelta(u.indices, u.values, float(u.num_samples)) for u in updates]


def check_range(name: str, value, lo: float, hi: float, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a ValueError naming the option unless ``value`` lies in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"option {name} must be a number in {interval}, got {value!r}")
