"""The round state machine: closing rules, the one extension, seeded selection."""
from __future__ import annotations

import pytest

from edgefl.wire.protocol import RoundAnnouncement, TrainingConfig
from edgefl_server.rounds import (
    FINISHED, OPEN, WAITING, Decision, RoundState, decide, randomk_seed, select_clients,
)

SEL = ("a", "b", "c", "d")


def open_round(**kw):
    return RoundState(3, 2, OPEN, deadline=100.0, selected=SEL, **kw)


@pytest.mark.parametrize("answered,now,extended,quorum,expect", [
    (4, 0.0, False, 3, Decision.CLOSE_ALL_ANSWERED),   # everyone answered before the deadline
    (3, 99.9, False, 3, Decision.WAIT),                # quorum, but the deadline is not there yet
    (3, 100.0, False, 3, Decision.CLOSE_QUORUM),
    (2, 100.0, False, 3, Decision.EXTEND),             # no quorum: one extension
    (2, 150.0, True, 3, Decision.CLOSE_NO_QUORUM),     # still none after it: take what arrived
    (0, 150.0, True, 3, Decision.CLOSE_NO_QUORUM),
    (4, 0.0, False, 10, Decision.CLOSE_ALL_ANSWERED),
    (4, 100.0, False, 10, Decision.CLOSE_ALL_ANSWERED),  # quorum above the selection is capped
])
def test_decide(answered, now, extended, quorum, expect):
    assert decide(open_round(extended=extended), answered, now=now, quorum=quorum) is expect


def test_decide_only_on_open_rounds():
    with pytest.raises(ValueError, match="round 3 is waiting"):
        decide(RoundState(3, 2, WAITING), 0, now=0.0, quorum=1)


def test_selection_is_seeded_sorted_and_bounded():
    online = [f"dev-{i:02d}" for i in range(20)]
    a = select_clients(online, 5, seed=1, round_id=4)
    assert a == select_clients(reversed(online), 5, seed=1, round_id=4)
    assert len(a) == 5 and list(a) == sorted(a) and set(a) <= set(online)
    picks = {select_clients(online, 5, seed=1, round_id=r) for r in range(10)}
    assert len(picks) > 5  # rounds differ
    assert select_clients(online, None, seed=1, round_id=4) == tuple(online)
    assert select_clients(online[:3], 5, seed=1, round_id=4) == tuple(online[:3])
    with pytest.raises(ValueError, match=">= 1"):
        select_clients(online, 0, seed=1, round_id=1)


def test_announcement_and_persistence_form():
    r = open_round(config=TrainingConfig(mu=0.1), randomk_seed=randomk_seed(7, 3))
    ann = RoundAnnouncement.from_json(r.announcement().to_json())
    assert (ann.round_id, ann.model_version, ann.state, ann.selected) == (3, 2, "open", SEL)
    assert ann.config.mu == 0.1 and ann.randomk_seed == r.randomk_seed < 2**64
    assert RoundState.from_dict(r.to_dict()) == r
    assert RoundState(4, 3, WAITING).announcement().state == "closed"
    assert RoundState(4, 3, FINISHED).announcement().state == "finished"
    assert randomk_seed(7, 3) != randomk_seed(7, 4)
