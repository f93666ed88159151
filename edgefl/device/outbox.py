"""The device's on-disk outbox: an update stays here until the server's receipt for it arrives.

paho keeps its MQTT session in memory only, so an update in flight when the device crashes, reboots
or loses power would be lost. Each update is written here before it is published (temporary file,
fsync, atomic rename, fsync of the directory), removed when a receipt (accepted or rejected) names
it, and handed to the broker again when the device starts. An update whose round is over can no
longer count, so it is dropped with a log line once an announcement shows a later round.

One file per update, named ``<round id>-<update id>.update``; the content is the encoded update
exactly as published (:func:`edgefl.wire.encode_update`).
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from edgefl.durable import TEMP_SUFFIX, replace_file

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(\d{10})-(\d{20})\.update$")


@dataclass(frozen=True, order=True)
class OutboxEntry:
    """One stored update, ordered by round and then update id."""

    round_id: int
    update_id: int
    size: int
    path: Path


class Outbox:
    """A bounded directory of updates waiting for their receipts.

    Parameters
    ----------
    directory : path
        Created if missing. Leftover temporary files from a crash during a write are removed.
    max_entries : int
        At most this many updates are kept; storing one more drops the oldest (the newest
        update is the one that can still count).
    max_bytes : int
        Same bound on their total size in bytes.

    Thread-safe: the training thread stores updates while the MQTT dispatcher removes them.
    """

    def __init__(self, directory, *, max_entries: int = 16, max_bytes: int = 64 << 20):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(
                f"outbox bounds must be positive, got max_entries={max_entries}, max_bytes={max_bytes}"
            )
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], OutboxEntry] = {}
        for path in self.directory.iterdir():
            if path.name.endswith(TEMP_SUFFIX):
                path.unlink(missing_ok=True)  # a write that never completed was never published
                continue
            match = _ENTRY.match(path.name)
            if match is None:
                log.warning("outbox %s: ignoring %s, which is not an outbox entry", self.directory, path.name)
                continue
            key = (int(match.group(1)), int(match.group(2)))
            self._entries[key] = OutboxEntry(*key, path.stat().st_size, path)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def entries(self) -> list[OutboxEntry]:
        """The stored updates, oldest round first."""
        with self._lock:
            return sorted(self._entries.values())

    def put(self, round_id: int, update_id: int, payload: bytes) -> OutboxEntry:
        """Store ``payload`` durably; when this returns, the update survives a crash.

        Raises
        ------
        ValueError
            If the ids are out of range or the payload alone exceeds ``max_bytes``.
        """
        if not 0 <= round_id < 10**10 or not 0 <= update_id < 2**64:
            raise ValueError(f"outbox: round id {round_id} or update id {update_id} is out of range")
        if len(payload) > self.max_bytes:
            raise ValueError(
                f"outbox: an update of {len(payload)} bytes exceeds the outbox bound of "
                f"{self.max_bytes} bytes; raise max_bytes or compress the update"
            )
        path = self.directory / f"{round_id:010d}-{update_id:020d}.update"
        replace_file(path, payload)
        entry = OutboxEntry(round_id, update_id, len(payload), path)
        with self._lock:
            self._entries[(round_id, update_id)] = entry
            evicted = self._evict_locked(keep=(round_id, update_id))
        for old in evicted:
            old.path.unlink(missing_ok=True)
            log.warning(
                "outbox full (%d updates, %d bytes max): dropped update %d of round %d without a receipt",
                self.max_entries, self.max_bytes, old.update_id, old.round_id,
            )
        return entry

    def read(self, entry: OutboxEntry) -> bytes:
        """The stored payload of ``entry``."""
        return entry.path.read_bytes()

    def remove(self, round_id: int, update_id: int) -> bool:
        """Forget an update once its receipt arrived; False if it was not (or no longer) here."""
        with self._lock:
            entry = self._entries.pop((round_id, update_id), None)
        if entry is None:
            return False
        entry.path.unlink(missing_ok=True)
        return True

    def drop_rounds_before(self, round_id: int) -> list[OutboxEntry]:
        """Drop every update of a round before ``round_id``: those rounds are over."""
        with self._lock:
            stale = [e for key, e in self._entries.items() if key[0] < round_id]
            for e in stale:
                del self._entries[(e.round_id, e.update_id)]
        for e in sorted(stale):
            e.path.unlink(missing_ok=True)
            log.info(
                "outbox: dropped update %d of round %d without a receipt: the server has moved on "
                "to round %d, where it can no longer count", e.update_id, e.round_id, round_id,
            )
        return stale

    def _evict_locked(self, keep) -> list[OutboxEntry]:
        evicted = []
        ordered = sorted(self._entries.values())
        total = sum(e.size for e in ordered)
        for e in ordered:
            if len(self._entries) <= self.max_entries and total <= self.max_bytes:
                break
            if (e.round_id, e.update_id) == keep:
                continue
            del self._entries[(e.round_id, e.update_id)]
            total -= e.size
            evicted.append(e)
        return evicted
