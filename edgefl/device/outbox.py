"""The device's on-disk outbox: an update stays here until the server's receipt for it arrives.

paho keeps its MQTT session in memory only, so an update in flight when the device crashes, reboots
or loses power would be lost. Each update is written here before it is published (temporary file,
fsync, atomic rename, fsync of the directory), removed when a receipt (accepted or rejected) names
it, and handed to the broker again when the device starts.

An update that can no longer count is dropped with a log line saying why when an announcement
shows it (:meth:`Outbox.expire`, the rule is :func:`why_expired`):

* in **synchronous** rounds the server accepts only updates of the current round, so an
  announcement of a later round drops the updates of every earlier one;
* in rounds of **buffered asynchronous aggregation** (FedBuff: the announcement carries
  ``max_staleness``) the server accepts an update of any round up to the current one as long as
  the model version it was trained on is at most ``max_staleness`` versions behind the announced
  one, so an update is kept, and resent while its receipt is overdue, until it is too stale;
  an update on a version more than ``max_staleness`` behind is dropped.

An announcement without ``max_staleness`` is a synchronous round: the device then cannot know
whether the server would take an update of an earlier round, and a synchronous server does not.
Whatever the rounds, the outbox is bounded (:class:`Outbox`): a full outbox drops its oldest
update.

One file per update, named ``<round id>-<update id>-<base version>.update`` (the model version it
was trained on); the content is the encoded update exactly as published
(:func:`edgefl.wire.encode_update`). Entries named ``<round id>-<update id>.update`` (written
before the base version was kept) are read with an unknown base version: a buffered round keeps
them until the server's receipt (accepted, or rejected as too stale) removes them.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from edgefl.durable import TEMP_SUFFIX, replace_file
from edgefl.wire.protocol import RoundAnnouncement

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(\d{10})-(\d{20})(?:-(\d{10}))?\.update$")


@dataclass(frozen=True, order=True)
class OutboxEntry:
    """One stored update, ordered by round and then update id.

    ``base_version`` is the model version it was trained on, None for an entry written before
    the outbox kept it.
    """

    round_id: int
    update_id: int
    base_version: int | None
    size: int
    path: Path


def why_expired(announcement: RoundAnnouncement, round_id: int, base_version: int | None) -> str:
    """Why an update of ``round_id`` trained on model ``base_version`` can no longer count once
    ``announcement`` is out, or "" while the server may still accept it.

    A synchronous round (``max_staleness`` None) ends every earlier round. A round of buffered
    aggregation accepts an update of any round up to its own if the update's base version is at
    most ``max_staleness`` versions behind the announced ``model_version`` (the server's rule,
    ``edgefl_server.buffer.BufferConfig.too_stale``); an unknown base is left to the server.
    """
    bound = announcement.max_staleness
    if bound is None:
        if round_id < announcement.round_id:
            return (f"the server has moved on to round {announcement.round_id}, where it can no "
                    "longer count")
        return ""
    if base_version is None:
        return ""
    behind = announcement.model_version - base_version
    if behind > bound:
        return (f"it was trained on model version {base_version}, {behind} versions behind the "
                f"announced {announcement.model_version}, and the server accepts at most {bound} "
                "(buffered aggregation, max_staleness)")
    return ""


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
            base = None if match.group(3) is None else int(match.group(3))
            self._entries[key] = OutboxEntry(*key, base, path.stat().st_size, path)

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

    def put(self, round_id: int, update_id: int, payload: bytes, *,
            base_version: int) -> OutboxEntry:
        """Store ``payload``, trained on model ``base_version``, durably; when this returns, the
        update survives a crash.

        Raises
        ------
        ValueError
            If the ids or the version are out of range or the payload alone exceeds
            ``max_bytes``.
        """
        if not (0 <= round_id < 10**10 and 0 <= update_id < 2**64 and 0 <= base_version < 10**10):
            raise ValueError(f"outbox: round id {round_id}, update id {update_id} or base version "
                             f"{base_version} is out of range")
        if len(payload) > self.max_bytes:
            raise ValueError(
                f"outbox: an update of {len(payload)} bytes exceeds the outbox bound of "
                f"{self.max_bytes} bytes; raise max_bytes or compress the update"
            )
        path = self.directory / f"{round_id:010d}-{update_id:020d}-{base_version:010d}.update"
        replace_file(path, payload)
        entry = OutboxEntry(round_id, update_id, base_version, len(payload), path)
        with self._lock:
            replaced = self._entries.get((round_id, update_id))
            self._entries[(round_id, update_id)] = entry
            evicted = self._evict_locked(keep=(round_id, update_id))
        if replaced is not None and replaced.path != path:  # stored before with another base
            replaced.path.unlink(missing_ok=True)
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

    def expire(self, announcement: RoundAnnouncement) -> list[OutboxEntry]:
        """Drop every update that can no longer count now that ``announcement`` is out
        (:func:`why_expired`), each with a log line saying why; return them."""
        with self._lock:
            expired = [(e, why) for e in self._entries.values()
                       if (why := why_expired(announcement, e.round_id, e.base_version))]
            for e, _ in expired:
                del self._entries[(e.round_id, e.update_id)]
        for e, why in sorted(expired):
            e.path.unlink(missing_ok=True)
            log.info("outbox: dropped update %d of round %d without a receipt: %s", e.update_id,
                     e.round_id, why)
        return sorted(e for e, _ in expired)

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
