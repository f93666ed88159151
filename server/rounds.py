"""The round state machine: who is selected, when a round closes, and what the next one is.

Pure logic with no MQTT and no storage, so every rule can be tested directly.

A round goes through three phases:

``waiting``
    The previous round is done (or none ran yet); the server waits until ``min_clients`` devices
    are online (their retained status says "online"), then selects and opens the round.
``open``
    Announced (retained, state "open") with its deadline; selected devices send one update each.
``finished``
    The last round was aggregated; the announcement says "finished" and nothing more happens.

When an open round closes (:func:`decide`):

* as soon as every selected device has an accepted update;
* at the deadline, if at least ``quorum`` updates were accepted;
* at the deadline without quorum, the deadline is **extended once** by the round timeout (devices
  that were slow get a second chance, the announcement is republished with the new deadline);
* at the extended deadline, the round closes with **whatever arrived**: the strategy aggregates
  the accepted updates, or, if none arrived, keeps the current model (the version does not
  change) and the next round trains the same model again.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from edgefl.wire.protocol import RoundAnnouncement, TrainingConfig

WAITING, OPEN, FINISHED = "waiting", "open", "finished"


@dataclass(frozen=True)
class RoundState:
    """Where the server is: the round, the model it trains, its phase, deadline and selection.

    ``selected`` lists the devices expected to answer (always explicit: "every online device" is
    resolved when the round opens, so the server knows whom it waits for). ``extended`` records
    that the one deadline extension was used, ``opened_at`` when the round opened (Unix time).
    ``open_to_all`` marks a round of buffered asynchronous aggregation (:mod:`edgefl_server.buffer`):
    every device may send, nobody is waited for, and the round closes when the buffer is full;
    its ``max_staleness`` is announced, so that a device keeps an update of an earlier round
    while the server would still accept it.
    ``expected_clients`` is the expected number of participants of a Poisson-sampled round
    (central DP divides the noised sum by it).
    """

    round_id: int
    model_version: int
    phase: str = WAITING
    deadline: float = 0.0
    selected: tuple[str, ...] = ()
    randomk_seed: int = 0
    config: TrainingConfig = field(default_factory=TrainingConfig)
    extended: bool = False
    opened_at: float = 0.0
    open_to_all: bool = False
    expected_clients: float = 0.0  # central DP's fixed denominator: rate * online devices
    max_staleness: int | None = None  # of an open_to_all round

    @functools.cached_property
    def selected_set(self) -> frozenset[str]:
        """``selected`` as a set: membership is checked for every update, in a fleet of
        thousands a scan of the tuple would cost more than decoding the update."""
        return frozenset(self.selected)

    def announcement(self) -> RoundAnnouncement:
        """What the retained round topic says in this state ("closed" while waiting)."""
        state = {OPEN: "open", FINISHED: "finished"}.get(self.phase, "closed")
        return RoundAnnouncement(self.round_id, self.model_version, self.deadline, self.config,
                                 None if self.open_to_all else self.selected, self.randomk_seed,
                                 state, self.max_staleness)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["selected"] = list(self.selected)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RoundState":
        d = dict(d)
        d["selected"] = tuple(d["selected"])
        d["config"] = TrainingConfig.from_dict(d["config"])
        return cls(**d)


class Decision(enum.Enum):
    """What to do with an open round now."""

    WAIT = "wait"
    CLOSE_ALL_ANSWERED = "every selected device answered"
    CLOSE_QUORUM = "deadline reached with quorum"
    EXTEND = "deadline reached without quorum: extended once"
    CLOSE_NO_QUORUM = "extended deadline reached without quorum: aggregating what arrived"
    CLOSE_BUFFER = "the buffer of accepted updates is full"


def decide(state: RoundState, answered: int, *, now: float, quorum: int) -> Decision:
    """Whether an open round waits, closes, or gets its one deadline extension.

    Parameters
    ----------
    state : RoundState
        An open round.
    answered : int
        Number of selected devices with an accepted update.
    now : float
        Current Unix time.
    quorum : int
        Accepted updates needed to close at the (first) deadline; capped at the selection size.
    """
    if state.phase != OPEN:
        raise ValueError(f"round {state.round_id} is {state.phase}, not open")
    if answered >= len(state.selected):
        return Decision.CLOSE_ALL_ANSWERED
    if now < state.deadline:
        return Decision.WAIT
    if answered >= min(quorum, len(state.selected)):
        return Decision.CLOSE_QUORUM
    if not state.extended:
        return Decision.EXTEND
    return Decision.CLOSE_NO_QUORUM


def select_clients(online: Iterable[str], count: int | None, *, seed: int, round_id: int) -> tuple[str, ...]:
    """The devices taking part in ``round_id``: ``count`` of ``online`` (all when None), sorted.

    The choice is a function of (seed, round id, the online set) only, so a restarted server that
    reselects makes the same choice, and runs are reproducible.
    """
    pool = sorted(set(online))
    if count is None or count >= len(pool):
        return tuple(pool)
    if count < 1:
        raise ValueError(f"clients per round must be >= 1, got {count}")
    rng = np.random.default_rng([seed, round_id])
    chosen = rng.choice(len(pool), size=count, replace=False)
    return tuple(sorted(pool[i] for i in chosen))


def poisson_select(online: Iterable[str], rate: float, rng: np.random.Generator) -> tuple[str, ...]:
    """Each of ``online`` independently with probability ``rate`` (Poisson sampling), sorted.

    The sampling central DP's accountant assumes (:mod:`edgefl_server.accounting`): the number
    selected varies from round to round, and may be zero. ``rng`` must be unpredictable to
    whoever the guarantee is against (the server seeds it from :mod:`secrets`), or the selection
    is as good as known.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], got {rate!r}")
    pool = sorted(set(online))
    chosen = rng.random(len(pool)) < rate
    return tuple(c for c, keep in zip(pool, chosen) if keep)


def randomk_seed(seed: int, round_id: int) -> int:
    """The round's shared random-k seed (64 bits), derived from the server seed and the round."""
    return int(np.random.SeedSequence([seed, round_id, 0x72616E646B]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class RoundResult:
    """What one closed round produced, as kept in the server's history.

    ``accepted`` counts the updates aggregated; ``rejected`` maps a rejection reason code (see
    :mod:`edgefl_server.ingest`) to its count; ``uplink_bytes`` are the update payload bytes
    received during the round, ``downlink_bytes`` the bytes the server published for it (model
    envelope, announcements, receipts; the broker fans them out to every subscriber);
    ``aggregation_seconds`` runs from the closing decision to the new model and the next
    announcement being acknowledged by the broker; ``last_update_to_model_seconds`` from the
    arrival of the round's last accepted update at the server to the same instant (it includes
    any wait for the deadline, and the downtime when the server restarted mid-round); ``metrics`` come from the server's
    ``evaluate`` callable (e.g. held-out accuracy); ``privacy`` says what the run's privacy is
    after this round (see :meth:`edgefl_server.aggregator.AggregationServer.privacy_report`).
    """

    round_id: int
    model_version: int
    accepted: int
    rejected: dict[str, int]
    uplink_bytes: int
    downlink_bytes: int
    aggregation_seconds: float
    metrics: dict[str, float]
    last_update_to_model_seconds: float = 0.0
    selected: tuple[str, ...] = ()
    stragglers: tuple[str, ...] = ()
    close_reason: str = ""
    privacy: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["selected"], d["stragglers"] = list(self.selected), list(self.stragglers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RoundResult":
        d = dict(d)
        d["selected"], d["stragglers"] = tuple(d["selected"]), tuple(d["stragglers"])
        return cls(**d)
