"""The server's durable state: round trips, idempotent updates, atomic round commits, kill -9."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgefl_server.model_builder import build_mlp
from edgefl_server.rounds import OPEN, WAITING, RoundState
from edgefl_server.store import ServerStore, StateError


@pytest.fixture
def model():
    return build_mlp((8, 4, 3), seed=1)


def open_store(path, strategy="fedavg"):
    return ServerStore(path, fleet="f1", strategy=strategy)


def test_new_directory_is_empty_then_round_trips(tmp_path, model):
    store = open_store(tmp_path)
    assert store.load() is None
    r0 = RoundState(1, 0, OPEN, 123.5, ("a", "b"), 99)
    store.initialize(model, r0)
    store.close()
    saved = open_store(tmp_path).load()
    assert saved.round == r0
    assert saved.model.version == 0 and saved.model.onnx == model.onnx
    assert saved.model.manifest == model.manifest
    np.testing.assert_array_equal(saved.model.weights, model.weights)
    assert saved.strategy_state == {} and saved.history == []
    with pytest.raises(StateError, match="already initialized"):
        open_store(tmp_path).initialize(model, r0)


def test_updates_are_idempotent_per_round_and_client(tmp_path, model):
    store = open_store(tmp_path)
    store.initialize(model, RoundState(1, 0, OPEN))
    def row(client, update_id, payload):
        return dict(round_id=1, client_id=client, update_id=update_id, base_version=0,
                    num_samples=5, payload=payload, received_at=1.0)

    store.add_updates([row("a", 2**64 - 1, b"first")])
    # a redelivery, and a second different update from the same client: neither is written
    store.add_updates([row("a", 2**64 - 1, b"first"), row("a", 7, b"other"), row("b", 7, b"second")])
    store.close()
    again = open_store(tmp_path)
    assert [(u.client_id, u.update_id, u.payload) for u in again.round_updates(1)] == [
        ("a", 2**64 - 1, b"first"), ("b", 7, b"second")]
    assert again.find_update(1, "a") == 2**64 - 1 and again.find_update(2, "a") is None


def test_accepted_keys_are_indexed_in_memory_and_agree_with_the_table(tmp_path, model):
    from edgefl_server.store import KEY_INDEX_ROUNDS

    store = open_store(tmp_path)
    store.initialize(model, RoundState(1, 0, OPEN))
    rounds = range(1, KEY_INDEX_ROUNDS + 3)  # more rounds than the index keeps
    for r in rounds:
        assert store.find_update(r, "a") is None  # indexes the round while it is empty
        store.add_updates([dict(round_id=r, client_id="a", update_id=10 + r, base_version=0,
                                num_samples=1, payload=b"u", received_at=1.0)])
        store.add_updates([dict(round_id=r, client_id="a", update_id=99, base_version=0,
                                num_samples=1, payload=b"v", received_at=2.0)])  # ignored
    assert [store.find_update(r, "a") for r in rounds] == [10 + r for r in rounds]
    store.close()
    again = open_store(tmp_path)  # rebuilt from the table after a restart
    assert [again.find_update(r, "a") for r in rounds] == [10 + r for r in rounds]
    assert again.find_update(1, "b") is None


class _FailingCommit:
    """A connection whose next COMMIT fails, as on a full disk."""

    def __init__(self, db):
        self.db, self.fail = db, True

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.fail:
            self.fail = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_an_update_whose_commit_failed_stays_unknown(tmp_path, model):
    store = open_store(tmp_path)
    store.initialize(model, RoundState(1, 0, OPEN))
    assert store.find_update(1, "a") is None
    row = dict(round_id=1, client_id="a", update_id=3, base_version=0, num_samples=1,
               payload=b"u", received_at=1.0)
    store._db = _FailingCommit(store._db)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.add_updates([row])
    # rolled back, and a retry must be stored, not judged a duplicate of what never reached disk
    assert store.find_update(1, "a") is None and store.round_updates(1) == []
    store.add_updates([row])
    assert store.find_update(1, "a") == 3 and len(store.round_updates(1)) == 1


def test_commit_round_is_atomic_and_keeps_duplicate_keys(tmp_path, model):
    store = open_store(tmp_path, "fedadam")
    store.initialize(model, RoundState(1, 0, OPEN, selected=("a",)))
    store.add_updates([dict(round_id=1, client_id="a", update_id=3, base_version=0,
                            num_samples=4, payload=b"u", received_at=1.0)])
    new = model.with_weights(model.weights + 1, version=1, round_id=1)
    nxt = RoundState(2, 1, WAITING)
    state = {"m": np.arange(4.0), "v": np.ones(4)}
    store.commit_round(closed_round=1, model=new, next_round=nxt, strategy_state=state,
                       record={"round_id": 1, "accepted": 1})
    # a failing commit (the record cannot be written) leaves everything as it was
    with pytest.raises(ValueError):
        store.commit_round(closed_round=2, model=new.with_weights(new.weights, version=2, round_id=2),
                           next_round=RoundState(3, 2, WAITING), strategy_state={},
                           record={"loss": float("nan")})
    store.close()
    saved = open_store(tmp_path, "fedadam").load()
    assert saved.model.version == 1 and saved.round == nxt
    np.testing.assert_array_equal(saved.model.weights, model.weights + 1)
    assert set(saved.strategy_state) == {"m", "v"}
    np.testing.assert_array_equal(saved.strategy_state["m"], np.arange(4.0))
    assert saved.history == [{"round_id": 1, "accepted": 1}]
    store = open_store(tmp_path, "fedadam")
    assert store.round_updates(1) == []  # folded into the model
    assert store.find_update(1, "a") == 3  # still known: a late duplicate is not counted again


def test_model_versions_never_go_back(tmp_path, model):
    store = open_store(tmp_path)
    store.initialize(model.with_weights(model.weights, version=5, round_id=5), RoundState(6, 5))
    with pytest.raises(StateError, match="older than the stored version 5"):
        store.commit_round(closed_round=6, model=model, next_round=RoundState(7, 0),
                           strategy_state={}, record={})
    # keeping the model (same version) is allowed
    store.commit_round(closed_round=6, model=model.with_weights(model.weights, version=5, round_id=5),
                       next_round=RoundState(7, 5), strategy_state={}, record={})
    assert store.load().round.round_id == 7


def test_state_directory_of_another_fleet_or_strategy_is_refused(tmp_path):
    open_store(tmp_path).close()
    with pytest.raises(StateError, match="strategy 'fedavg', not 'fedyogi'.*--strategy fedavg"):
        open_store(tmp_path, "fedyogi")
    with pytest.raises(StateError, match="fleet 'f1'"):
        ServerStore(tmp_path, fleet="other", strategy="fedavg")


def test_stored_update_survives_sigkill(tmp_path, model):
    """add_updates returning means the update is on disk: kill -9 right after loses nothing."""
    open_store(tmp_path).initialize(model, RoundState(1, 0, OPEN))
    script = textwrap.dedent(f"""
        import os, signal
        from edgefl_server.store import ServerStore
        store = ServerStore({str(tmp_path)!r}, fleet="f1", strategy="fedavg")
        for i in range(20):
            store.add_updates([dict(round_id=1, client_id=f"d{{i}}", update_id=i, base_version=0,
                                    num_samples=1, payload=bytes([i]) * 1000,
                                    received_at=float(i))])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stored = open_store(tmp_path).round_updates(1)
    assert [u.update_id for u in stored] == list(range(20))
    assert all(u.payload == bytes([u.update_id]) * 1000 for u in stored)
