"""Durable server state in one SQLite database: model, round, strategy and downlink state,
accepted updates.

The database runs in WAL mode with ``synchronous=FULL``, so a transaction that returned is on disk
and survives ``kill -9`` or a power cut; every change that must be all-or-nothing (closing a round:
new model + optimizer state + next round + the round's history record) is one transaction. An
update is written here *before* the server acknowledges it to the broker, so an acknowledged
update is never lost, and the primary key (round, client) makes a redelivered duplicate a no-op.
Which (round, client) pairs hold an update is also kept in memory for the rounds asked about
lately (read from the database once per round, so it is rebuilt after a restart): judging an
update costs a dictionary lookup, not a query.

Arrays are stored as raw little-endian bytes (weights) or ``.npy`` bytes loaded with
``allow_pickle=False`` (optimizer state): nothing in the state directory can execute code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgefl.wire.model import Model, ModelManifest

from .rounds import RoundState

#: Bumped when the tables change incompatibly; an older server refuses a newer state directory.
SCHEMA_VERSION = 1
DB_NAME = "server.sqlite"
#: Seconds a write waits for another process's transaction before it fails.
BUSY_TIMEOUT = 60.0
#: Rounds whose accepted (client -> update id) keys stay in memory: the open one, the previous
#: one (late duplicates) and a few asked about by stale or hostile updates.
KEY_INDEX_ROUNDS = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model (
    version INTEGER PRIMARY KEY, round_id INTEGER NOT NULL, manifest BLOB NOT NULL,
    weights BLOB NOT NULL, onnx BLOB NOT NULL, onnx_sha256 BLOB NOT NULL, signature BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS strategy_state (name TEXT PRIMARY KEY, array BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    round_id INTEGER NOT NULL, client_id TEXT NOT NULL, update_id TEXT NOT NULL,
    base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL, nbytes INTEGER NOT NULL,
    received_at REAL NOT NULL, payload BLOB, PRIMARY KEY (round_id, client_id));
CREATE TABLE IF NOT EXISTS history (round_id INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS downlink_state (name TEXT PRIMARY KEY, array BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rejections (
    round_id INTEGER NOT NULL, code TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (round_id, code));
"""


class StateError(RuntimeError):
    """The state directory cannot be used by this server (another fleet, strategy or schema)."""


class StoredUpdate(NamedTuple):
    """An accepted update as stored: who sent it, its id and the payload exactly as received."""

    client_id: str
    update_id: int
    payload: bytes


@dataclass
class SavedState:
    """Everything a restarted server resumes from."""

    model: Model
    round: RoundState
    strategy_state: dict[str, np.ndarray]
    history: list[dict]
    downlink_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _model_from_row(row) -> Model:
    version, round_id, manifest, weights, onnx_bytes, sha, signature = row
    return Model(version, round_id, ModelManifest.from_bytes(manifest),
                 np.frombuffer(weights, dtype="<f4").astype(np.float32),
                 bytes(onnx_bytes), bytes(sha), bytes(signature))


_LATEST_MODEL = ("SELECT version, round_id, manifest, weights, onnx, onnx_sha256, signature "
                 "FROM model ORDER BY version DESC LIMIT 1")


def read_latest_model(state_dir) -> Model:
    """The newest global model of a state directory, read-only (a running server may own it).

    Raises
    ------
    StateError
        If the directory holds no server state or no model yet.
    """
    path = Path(state_dir) / DB_NAME
    if not path.is_file():
        raise StateError(f"{state_dir} is not a server state directory (no {DB_NAME})")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = db.execute(_LATEST_MODEL).fetchone()
    except sqlite3.Error as exc:
        raise StateError(f"cannot read {path}: {exc}") from None
    finally:
        db.close()
    if row is None:
        raise StateError(f"state directory {state_dir} holds no model yet")
    return _model_from_row(row)


class ServerStore:
    """The server's state directory. Thread-safe: one connection guarded by a lock.

    Parameters
    ----------
    state_dir : path
        Created if missing; holds ``server.sqlite`` (plus SQLite's ``-wal``/``-shm`` files).
    fleet, strategy : str
        Recorded on first use; a later start with another fleet or strategy is refused, because
        the saved optimizer state and rounds belong to the first.
    """

    def __init__(self, state_dir, *, fleet: str, strategy: str):
        self.path = Path(state_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Ingestion workers (other processes) share the database: a writer waits for the others'
        # transactions rather than failing.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._keys: OrderedDict[int, dict[str, int]] = OrderedDict()  # round -> client -> update id
        self._round_text: tuple[str, RoundState] | None = None  # the stored round, parsed
        self._claim(fleet=fleet, strategy=strategy, schema=str(SCHEMA_VERSION))

    def _claim(self, **expected: str) -> None:
        with self._transaction() as db:
            for key, value in expected.items():
                row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
                elif row[0] != value:
                    raise StateError(
                        f"state directory {self.path.parent} belongs to {key} {row[0]!r}, not "
                        f"{value!r}: pass --{key} {row[0]} to resume it, or use a new --state-dir"
                    )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- transactions ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction (``BEGIN IMMEDIATE``), committed on success, else rolled back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (e.g. a full disk) may leave it open
                    self._db.execute("ROLLBACK")
                raise

    # -- model, round, strategy state ------------------------------------------------------------

    def load(self) -> SavedState | None:
        """The saved state, or None for a state directory that never held a model."""
        with self._transaction() as db:
            row = db.execute(_LATEST_MODEL).fetchone()
            if row is None:
                return None
            model = _model_from_row(row)
            (round_json,) = db.execute("SELECT value FROM meta WHERE key = 'round'").fetchone()
            state = {name: _load_array(blob)
                     for name, blob in db.execute("SELECT name, array FROM strategy_state")}
            history = [json.loads(r) for (r,) in
                       db.execute("SELECT record FROM history ORDER BY round_id")]
            downlink = {name: _load_array(blob)
                        for name, blob in db.execute("SELECT name, array FROM downlink_state")}
        return SavedState(model, RoundState.from_dict(json.loads(round_json)), state, history,
                          downlink)

    def initialize(self, model: Model, round_state: RoundState) -> None:
        """Record the first model and round of a new state directory."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM model").fetchone():
                raise StateError(f"state directory {self.path.parent} is already initialized")
            _put_model(db, model)
            _put_round(db, round_state)

    def save_round(self, round_state: RoundState) -> None:
        """Persist a round that opened or got its deadline extended."""
        with self._transaction() as db:
            _put_round(db, round_state)

    def commit_round(self, *, closed_round: int, model: Model, next_round: RoundState,
                     strategy_state: dict[str, np.ndarray], record: dict,
                     downlink_state: dict[str, np.ndarray] | None = None,
                     counted: list[tuple[int, str]] | None = None) -> None:
        """Close ``closed_round`` atomically: new model, optimizer state, next round, history
        (and the downlink error-feedback residual, when refreshes are compressed).

        ``counted`` names the (round, client) updates the model now holds when they are not
        simply the closed round's (asynchronous aggregation buffers updates of several rounds).

        The closed round's payloads are dropped (they are in the model now) but their keys stay,
        so a late QoS 1 duplicate of a counted update is recognised and never counted again.

        Raises
        ------
        StateError
            If ``model`` is older than the stored one: versions only ever increase.
        """
        with self._transaction() as db:
            _commit_round(db, closed_round=closed_round, model=model, next_round=next_round,
                          strategy_state=strategy_state, record=record,
                          downlink_state=downlink_state, counted=counted)

    @contextlib.contextmanager
    def closing_round(self, round_id: int):
        """Close a round that ingestion workers (other processes) feed, in one transaction.

        Yields a :class:`ClosingRound`: its ``updates`` are every accepted update of the round,
        and none can be added until the block ends, because workers store updates in write
        transactions that check the round is still open (:meth:`shared_ingest`). Call its
        ``commit`` (same arguments as :meth:`commit_round`) inside the block; leaving the block
        by an exception writes nothing. The block holds the store's lock: call no other method
        of the store inside it.
        """
        with self._transaction() as db:
            rows = db.execute(
                "SELECT client_id, update_id, payload FROM updates WHERE round_id = ? "
                "AND payload IS NOT NULL ORDER BY client_id", (round_id,)).fetchall()
            rejected = dict(db.execute("SELECT code, count FROM rejections WHERE round_id = ?",
                                       (round_id,)).fetchall())
            yield ClosingRound(db, round_id, [StoredUpdate(c, int(u), bytes(p)) for c, u, p in rows],
                               rejected)

    @contextlib.contextmanager
    def shared_ingest(self):
        """A write transaction for one ingestion worker's batch, judged against the stored round.

        Yields a :class:`SharedIngest`: ``round`` is the round as stored right now (the
        coordinator may have closed it since the worker last looked), ``stored`` finds updates
        already accepted (by any worker), ``add`` stores accepted ones. Committed when the block
        ends, so the batch is judged and stored without another process writing in between.
        """
        with self._transaction() as db:
            (text,) = db.execute("SELECT value FROM meta WHERE key = 'round'").fetchone()
            if self._round_text is None or self._round_text[0] != text:
                self._round_text = (text, RoundState.from_dict(json.loads(text)))
            yield SharedIngest(db, self._round_text[1])

    def count_updates(self, round_id: int) -> int:
        """How many updates of ``round_id`` are stored for aggregation."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM updates WHERE round_id = ? AND payload "
                                    "IS NOT NULL", (round_id,)).fetchone()
        return int(n)

    def save_record(self, round_id: int, record: dict) -> None:
        """Replace the history record of a closed round (to add its evaluation metrics)."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO history VALUES (?, ?)",
                       (round_id, json.dumps(record, allow_nan=False)))

    # -- updates ---------------------------------------------------------------------------------

    def find_update(self, round_id: int, client_id: str) -> int | None:
        """The id of ``client_id``'s accepted update in ``round_id``, or None."""
        with self._lock:
            return self._round_keys(round_id).get(client_id)

    def _round_keys(self, round_id: int) -> dict[str, int]:
        """The in-memory index of a round's accepted updates (caller holds the lock)."""
        keys = self._keys.get(round_id)
        if keys is None:
            keys = {c: int(u) for c, u in self._db.execute(
                "SELECT client_id, update_id FROM updates WHERE round_id = ?", (round_id,))}
            self._keys[round_id] = keys
            if len(self._keys) > KEY_INDEX_ROUNDS:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(round_id)
        return keys

    def add_updates(self, rows: list[dict]) -> None:
        """Store accepted updates durably, all in one transaction (group commit).

        Each row has ``round_id, client_id, update_id, base_version, num_samples, payload,
        received_at``. A (round, client) already stored keeps its first update: the primary key
        makes a redelivered duplicate a no-op.
        """
        with self._transaction() as db:
            _insert_updates(db, rows)
        # Only after the commit returned: an update the index knows is on disk (a failed commit
        # must leave it unknown, or its retry would be judged a duplicate and acknowledged).
        # The first update of a (round, client) stays, as in the table.
        with self._lock:
            for r in rows:
                keys = self._keys.get(r["round_id"])
                if keys is not None:
                    keys.setdefault(r["client_id"], int(r["update_id"]))

    def pending_updates(self) -> list[StoredUpdate]:
        """Every accepted update not yet aggregated, of any round, in arrival order (the
        buffer of asynchronous aggregation)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, update_id, payload FROM updates WHERE payload IS NOT NULL "
                "ORDER BY received_at, client_id").fetchall()
        return [StoredUpdate(c, int(u), bytes(p)) for c, u, p in rows]

    def round_updates(self, round_id: int) -> list[StoredUpdate]:
        """The accepted updates of an open round, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, update_id, payload FROM updates WHERE round_id = ? "
                "AND payload IS NOT NULL ORDER BY received_at, client_id", (round_id,)).fetchall()
        return [StoredUpdate(c, int(u), bytes(p)) for c, u, p in rows]


class ClosingRound:
    """A round being closed by :meth:`ServerStore.closing_round`: its updates, frozen, in
    client-id order, and the workers' rejections while it was current (by reason code)."""

    def __init__(self, db, round_id: int, updates: list[StoredUpdate], rejected: dict[str, int]):
        self._db, self.round_id, self.updates, self.rejected = db, round_id, updates, rejected

    def commit(self, *, model: Model, next_round: RoundState,
               strategy_state: dict[str, np.ndarray], record: dict,
               downlink_state: dict[str, np.ndarray] | None = None) -> None:
        """Write what :meth:`ServerStore.commit_round` writes, in the closing transaction."""
        _commit_round(self._db, closed_round=self.round_id, model=model, next_round=next_round,
                      strategy_state=strategy_state, record=record,
                      downlink_state=downlink_state)


class SharedIngest:
    """One ingestion worker's write transaction (:meth:`ServerStore.shared_ingest`)."""

    def __init__(self, db, round_state: RoundState):
        self._db, self.round = db, round_state

    def stored(self, round_id: int, client_ids) -> dict[str, int]:
        """The stored update ids of these clients in ``round_id`` (one query for the batch)."""
        ids = sorted(set(client_ids))
        found = {}
        for start in range(0, len(ids), 500):  # SQLite bounds the number of parameters
            part = ids[start:start + 500]
            found.update((c, int(u)) for c, u in self._db.execute(
                f"SELECT client_id, update_id FROM updates WHERE round_id = ? AND client_id IN "
                f"({','.join('?' * len(part))})", (round_id, *part)))
        return found

    def add(self, rows: list[dict]) -> None:
        """Store accepted updates (see :meth:`ServerStore.add_updates`)."""
        if rows:
            _insert_updates(self._db, rows)

    def count_rejected(self, codes: dict[str, int]) -> None:
        """Add rejections (reason code -> count) to the stored round's record."""
        self._db.executemany(
            "INSERT INTO rejections VALUES (?, ?, ?) ON CONFLICT (round_id, code) "
            "DO UPDATE SET count = count + excluded.count",
            [(self.round.round_id, code, n) for code, n in codes.items()])


def _insert_updates(db, rows: list[dict]) -> None:
    db.executemany(
        "INSERT OR IGNORE INTO updates VALUES (:round_id, :client_id, :update_id, "
        ":base_version, :num_samples, :nbytes, :received_at, :payload)",
        [{**r, "update_id": str(r["update_id"]), "nbytes": len(r["payload"])} for r in rows])


def _commit_round(db, *, closed_round: int, model: Model, next_round: RoundState,
                  strategy_state: dict[str, np.ndarray], record: dict,
                  downlink_state: dict[str, np.ndarray] | None = None,
                  counted: list[tuple[int, str]] | None = None) -> None:
    (current,) = db.execute("SELECT MAX(version) FROM model").fetchone()
    if model.version < current:
        raise StateError(f"model version {model.version} is older than the stored "
                         f"version {current}; versions only increase")
    if model.version > current:
        _put_model(db, model)
        db.execute("DELETE FROM model WHERE version < ?", (model.version,))
    db.execute("DELETE FROM strategy_state")
    db.executemany("INSERT INTO strategy_state VALUES (?, ?)",
                   [(k, _dump_array(v)) for k, v in strategy_state.items()])
    if downlink_state is not None:
        db.execute("DELETE FROM downlink_state")
        db.executemany("INSERT INTO downlink_state VALUES (?, ?)",
                       [(k, _dump_array(v)) for k, v in downlink_state.items()])
    _put_round(db, next_round)
    db.execute("INSERT OR REPLACE INTO history VALUES (?, ?)",
               (closed_round, json.dumps(record, allow_nan=False)))
    if counted is None:
        db.execute("UPDATE updates SET payload = NULL WHERE round_id = ?", (closed_round,))
    else:
        db.executemany("UPDATE updates SET payload = NULL WHERE round_id = ? AND client_id = ?",
                       counted)


def _put_model(db, model: Model) -> None:
    db.execute("INSERT INTO model VALUES (?, ?, ?, ?, ?, ?, ?)",
               (model.version, model.round_id, model.manifest.to_bytes(),
                model.weights.astype("<f4").tobytes(), model.onnx, model.onnx_sha256,
                model.signature))


def _put_round(db, round_state: RoundState) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES ('round', ?)",
               (json.dumps(round_state.to_dict(), allow_nan=False),))


def _dump_array(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _load_array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)
