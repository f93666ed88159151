"""Ingestion workers: several processes share a fleet's update stream, one coordinator owns rounds.

With ``ingest_workers=N`` (``edgefl server --ingest-workers N``, N >= 2) the aggregator process
becomes the **coordinator**: it tracks devices, opens, extends and closes rounds, aggregates and
publishes, but no longer reads updates. N worker processes do, through one MQTT v5 shared
subscription, ``$share/<group>/edgefl/<fleet>/clients/+/update``: the broker hands each
update to one of them. On a provisioned fleet each worker logs in as its own broker user
(``<server user>.w<i>``, made by ``edgefl fleet``), opens sealed updates and signs its receipts
with the server's keys from the fleet directory, and the group is a name only the server's side
can compute (:meth:`edgefl_server.provisioning.Fleet.share_group`; why in
:mod:`edgefl_server.provisioning`). With ``--insecure`` the group is the server id. A worker decodes and validates its batch, then judges and stores it in one
write transaction of the shared state database that also reads the round as stored
(:meth:`edgefl_server.store.ServerStore.shared_ingest`), acknowledges the messages and sends the
receipts, and reports the batch to the coordinator (only to wake it and for the round's counts:
the database is the truth).

Key rotation: a worker looks at the fleet's key files every
:data:`~edgefl_server.provisioning.KEY_CHECK_INTERVAL` seconds and, after a rotation the
coordinator promoted, signs its receipts with the new key and opens updates sealed to the new
and (until the rotation is finished) the replaced sealing key. A receipt a device cannot verify
in the moment between the two is refused by it, and the update it answers is resent and
answered again.

Why a round's result does not depend on the number of workers: the coordinator closes a round in
one transaction that freezes its updates (:meth:`~edgefl_server.store.ServerStore.closing_round`):
an update is stored before it, and aggregated, or judged after it against the next round (late).
The aggregator then aggregates the round's updates in client-id order, whichever process stored
them in whatever order, so one process and N workers compute the same sums in the same order:
bit for bit the same model.

Why a worker that dies loses nothing: it acknowledges an update only after its transaction
committed, so an acknowledged update is on disk; one it had not acknowledged stays in its broker
session. Mosquitto 2 keeps the in-flight and queued messages of a shared-subscription member in
that member's session (it does not hand them to the other members), so the coordinator restarts
a dead worker under the same login and client id (a persistent session), and the
broker delivers them again; one the worker had stored but not acknowledged comes back as a
duplicate and is not counted twice.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from edgefl.wire.protocol import Topics
from edgefl.transport.mqtt import BrokerRefused, BrokerUnreachable, MqttConnection
from edgefl.trust import Signer

from .influence import InfluenceBounds
from .provisioning import KEY_CHECK_INTERVAL, ingest_worker_principal, open_fleet
from .ingest import (ACCEPTED, DUPLICATE, MAX_BATCH, RECEIVE_MAXIMUM, UpdateIngestor,
                     answer_batch)
from .store import ServerStore

log = logging.getLogger(__name__)

#: How often the coordinator looks for dead workers, in seconds.
SUPERVISE_INTERVAL = 0.5


def worker_client_id(server_id: str, index: int) -> str:
    """The fixed MQTT client id of ingestion worker ``index`` (its broker session); on a
    provisioned fleet the broker uses the worker's login instead, the same for every start."""
    return f"{server_id}.w{index}"


def share_group(config) -> str:
    """The MQTT share group of the workers of ``config``'s server (see the module docstring)."""
    if config.insecure:
        return config.server_id
    return open_fleet(config.fleet_dir).share_group()


def _worker_identity(config, index: int):
    """``(broker login keywords, sealing keys, receipt signer)`` of worker ``index``."""
    if config.insecure:
        return dict(username=config.username, password=config.password, tls=config.tls,
                    ca_certs=config.ca_certs), None, None
    fleet = open_fleet(config.fleet_dir)
    login = dict(username=ingest_worker_principal(fleet.fleet, index),
                 password=fleet.server_credentials()["password"], tls=True,
                 ca_certs=str(fleet.ca_cert))
    # Receipts are not ordered messages (a device accepts any sequence for them), so the
    # workers need no shared sequence file: each signer counts from its clock.
    return login, fleet.sealing_keys(), Signer(fleet.signing_key(), config.fleet)


class _Keys:
    """A worker's keys, reloaded from the fleet directory when its key files change."""

    def __init__(self, config, ingestor, signer):
        self.fleet = None if config.insecure else open_fleet(config.fleet_dir)
        self.ingestor, self.signer = ingestor, signer
        # Unknown: the first look reloads the keys, in case they changed since they were read.
        self.state = None
        self.checked_at = time.monotonic()

    def check(self) -> None:
        """Reload the keys if the fleet's key files changed (looks every
        :data:`KEY_CHECK_INTERVAL` seconds at most)."""
        if self.fleet is None or time.monotonic() - self.checked_at < KEY_CHECK_INTERVAL:
            return
        self.checked_at = time.monotonic()
        state = self.fleet.key_state()
        if state == self.state:
            return
        self.state = state
        try:
            self.ingestor.set_sealing_keys(self.fleet.sealing_keys())
            self.signer = Signer(self.fleet.signing_key(), self.fleet.fleet)
        except Exception:  # noqa: BLE001 - keep ingesting with the keys it has
            log.exception("reloading the keys of %s failed; keeping the current ones",
                          self.fleet.directory)


@dataclass(frozen=True)
class BatchReport:
    """What a worker tells the coordinator after storing and answering one batch."""

    worker: int
    round_id: int  # the stored round the batch was judged against
    accepted: int
    rejected: dict[str, int] = field(default_factory=dict)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    last_arrival: float = 0.0  # when the newest accepted update of the batch reached the worker


class _BatchCounts:
    """The metrics interface of :func:`~edgefl_server.ingest.answer_batch`, for one report."""

    def __init__(self):
        self.accepted, self.rejected, self.uplink, self.downlink = 0, Counter(), 0, 0

    def count_update(self, nbytes: int, rejected_reason: str | None = None) -> None:
        self.uplink += nbytes
        if rejected_reason is None:
            self.accepted += 1
        else:
            self.rejected[rejected_reason] += 1

    def count_published(self, nbytes: int) -> None:
        self.downlink += nbytes


def run_worker(config, index: int, num_params: int, reports, stop, log_level: int) -> None:
    """The body of ingestion worker process ``index`` (started by :class:`IngestWorkers`).

    Parameters
    ----------
    config : edgefl_server.app.ServerConfig
        The coordinator's configuration (broker, fleet, state directory, limits, rounds).
    index : int
        The worker's number; its client id is :func:`worker_client_id`.
    num_params : int
        Parameters of the fleet's model (updates of another size are malformed).
    reports : multiprocessing.Queue
        Where :class:`BatchReport` s (and a first ``("ready", index)`` or
        ``("failed", index, reason)``) go.
    stop : multiprocessing.Event
        Set by the coordinator to stop; the worker also stops when the coordinator is gone.
    log_level : int
        The coordinator's logging level.
    """
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    # Ctrl-C in a terminal reaches every process of the group: the coordinator stops its workers
    # itself (each finishes its batch). A SIGTERM for a worker alone ends it as cleanly; what it
    # had not acknowledged stays in its session, and the coordinator starts it again.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    topics = Topics(config.fleet)
    try:
        login, sealing_keys, signer = _worker_identity(config, index)
        group = share_group(config)
    except Exception as exc:  # noqa: BLE001 - e.g. a fleet directory it cannot read
        reports.put(("failed", index, f"cannot load the fleet's keys and logins: {exc}"))
        return
    store = ServerStore(config.state_dir, fleet=config.fleet, strategy=config.strategy)
    ingestor = UpdateIngestor(store, topics, num_params=num_params,
                              max_update_bytes=config.max_update_bytes,
                              bounds=InfluenceBounds(config.max_samples, config.max_update_norm),
                              sealing_key=sealing_keys)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    conn = MqttConnection(
        worker_client_id(config.server_id, index), config.broker_url, **login,
        manual_ack=True, receive_maximum=RECEIVE_MAXIMUM,
        subscriptions=[(topics.shared_updates(group), 1)],
        on_message=lambda msg: inbox.put((msg, time.time())))
    try:
        conn.start(timeout=30)
    except BrokerUnreachable as exc:
        reason = str(exc)
        if isinstance(exc, BrokerRefused) and not config.insecure:
            reason += ("; a fleet directory made before ingestion workers existed lacks their "
                       "logins: re-run `edgefl fleet init` with its --fleet, --host and --port "
                       "(it adds them and reloads a running broker)")
        reports.put(("failed", index, reason))
        store.close()
        return
    reports.put(("ready", index))
    parent = mp.parent_process()
    keys = _Keys(config, ingestor, signer)
    try:
        while not (stop.is_set() or terminated.is_set()) and \
                (parent is None or parent.is_alive()):
            keys.check()
            try:
                batch = [inbox.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            _ingest(ingestor, conn, topics, config, index, batch, reports, stop, keys.signer)
    finally:
        conn.stop()  # what was not acknowledged stays in the broker session
        store.close()


def _ingest(ingestor, conn, topics, config, index, batch, reports, stop, signer) -> None:
    messages = [m for m, _ in batch]
    payloads = [bytes(m.payload) for m in messages]
    delay = 0.5
    while True:
        try:
            outcomes, round_state = ingestor.ingest_batch_shared(
                [(m.topic, p) for m, p in zip(messages, payloads)], now=time.time())
            break
        except Exception:  # noqa: BLE001 - e.g. a full disk: nothing acknowledged, retry
            log.exception("storing %d update(s) failed; retrying in %.1f s", len(batch), delay)
            if stop.wait(delay):
                return  # unacknowledged: the broker keeps them for this session
            delay = min(2 * delay, 30.0)
    counts = _BatchCounts()
    answer_batch(conn, topics, messages, outcomes, [len(p) for p in payloads], metrics=counts,
                 confirm=round_state.round_id >= config.rounds, signer=signer)
    arrivals = [t for (_, t), o in zip(batch, outcomes) if o.status == ACCEPTED]
    reports.put(BatchReport(index, round_state.round_id, counts.accepted - sum(
        o.status == DUPLICATE for o in outcomes), dict(counts.rejected), counts.uplink,
        counts.downlink, max(arrivals, default=0.0)))


class IngestWorkers:
    """The coordinator's side: starts, supervises (restarts) and stops the worker processes.

    Parameters
    ----------
    config : edgefl_server.app.ServerConfig
    count : int
        Number of worker processes.
    num_params : int
        Parameters of the fleet's model.
    on_report : callable(BatchReport)
        Runs on a thread of the coordinator for every batch a worker stored.
    on_restart : callable(), optional
        Runs when a dead worker was restarted.
    """

    def __init__(self, config, count: int, num_params: int,
                 on_report: Callable[[BatchReport], None],
                 on_restart: Callable[[], None] | None = None):
        self.config, self.count, self.num_params = config, count, num_params
        self.on_report, self.on_restart = on_report, on_restart
        self.restarts = 0
        self._ctx = mp.get_context("spawn")  # no fork of a process that runs threads
        self._reports = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._procs: list = [None] * count
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, timeout: float = 60.0) -> "IngestWorkers":
        """Start every worker and wait until each is connected and subscribed.

        Raises
        ------
        BrokerUnreachable
            If a worker could not connect within ``timeout`` (the others are stopped again).
        """
        for i in range(self.count):
            self._spawn(i)
        ready, deadline = set(), time.monotonic() + timeout
        try:
            while len(ready) < self.count:
                try:
                    item = self._reports.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise BrokerUnreachable(
                        f"{self.count - len(ready)} ingestion worker(s) did not connect to "
                        f"{self.config.broker_url} within {timeout:g} s") from None
                if isinstance(item, tuple) and item[0] == "failed":
                    raise BrokerUnreachable(f"ingestion worker {item[1]}: {item[2]}")
                if isinstance(item, tuple) and item[0] == "ready":
                    ready.add(item[1])
        except BaseException:
            self.stop()
            raise
        for target, name in ((self._read_reports, "reports"), (self._supervise, "supervisor")):
            thread = threading.Thread(target=target, name=f"edgefl-workers-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("%d ingestion workers share the updates of fleet %s (%s)", self.count,
                 self.config.fleet, "share group " + self.config.server_id
                 if self.config.insecure else "a share group named from the server's password")
        return self

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(
            target=run_worker, name=f"edgefl-ingest-w{index}", daemon=True,
            args=(self.config, index, self.num_params, self._reports, self._stop,
                  logging.getLogger().getEffectiveLevel()))
        proc.start()
        self._procs[index] = proc

    def _read_reports(self) -> None:
        while not self._stopping.is_set():
            try:
                item = self._reports.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            if isinstance(item, BatchReport):
                try:
                    self.on_report(item)
                except Exception:  # noqa: BLE001 - a report is bookkeeping, never fatal
                    log.exception("handling a report of worker %d failed", item.worker)
            elif item[0] == "failed":
                log.error("restarted ingestion worker %d cannot connect: %s", item[1], item[2])

    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_INTERVAL):
            for index, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive() and not self._stopping.is_set():
                    log.warning("ingestion worker %d exited (code %s); restarting it under the "
                                "same client id, the broker redelivers what it had not "
                                "acknowledged", index, proc.exitcode)
                    self.restarts += 1
                    self._spawn(index)
                    if self.on_restart is not None:
                        self.on_restart()

    def pids(self) -> list[int]:
        """The process ids of the running workers (for operators and tests)."""
        return [p.pid for p in self._procs if p is not None and p.is_alive()]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every worker: each finishes its batch and disconnects, keeping its session."""
        self._stopping.set()
        self._stop.set()
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout)
                if proc.is_alive():
                    log.warning("ingestion worker %s did not stop in %gs; terminating it",
                                proc.name, timeout)
                    proc.terminate()
                    proc.join(5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
