"""Update ingestion: size bound -> decode -> validate -> durable store, one message at a time.

:meth:`UpdateIngestor.ingest` takes one MQTT message from a device and says what became of it; the
server then acknowledges the message to the broker (only now: an accepted update is already on
disk) and publishes the receipt. Nothing here raises for bad input: every outcome, including a
malformed payload, is an :class:`Outcome` with a reason code (counted in the metrics) and a
message a person can act on (sent in the receipt and logged).

Checks, in order, each with its reason code:

============================  =====================================================================
``oversized``                 payload above ``max_update_bytes`` (not decoded at all)
``bad_topic``                 not ``edgefl/<fleet>/clients/<id>/update``
``bad_seal``                  not sealed to this server's key (or, during a key rotation, to the
                              one it replaced) by the topic's device, or altered, or sealed for
                              another round than the update inside
                              (:class:`edgefl.trust.Opener`); only with a sealing key
``malformed``                 :func:`edgefl.wire.decode_update` refused it (truncated, bad checksum,
                              wrong dimensions, indices out of range, NaN/Inf, ...)
``client_mismatch``           the payload's client id is not the topic's: one device cannot speak
                              for another
(duplicate)                   same (client, round, update id) as a stored update: the same
                              "accepted" receipt again, counted once
``conflict``                  a second, different update from a client in one round
``unknown_round``             a round that has not started
``late`` / ``stale_round``    the previous round (closed before it arrived) / an older one
``round_not_open``            the current round is not open (waiting for devices or finished)
``not_selected``              the client is not selected for the round
``wrong_model_version``       trained on another model version than the round's
``too_stale``                 buffered asynchronous mode (FedBuff): trained on a version more than
                              ``max_staleness`` versions behind (replaces the four checks above)
``no_samples``                a sample count of zero (it would carry no weight)
============================  =====================================================================

An accepted update is then bounded (:class:`~edgefl_server.influence.InfluenceBounds`): its
sample count capped, its norm clipped; :attr:`Outcome.bounded` names what was bounded. The
payload stored for it is the opened (plain) update.

Malformed and oversized payloads cannot be trusted to name their round and update id, so they get
no receipt: they are dropped with a log line (a device's outbox entry then expires with its round,
or under buffered aggregation once it is more than ``max_staleness`` versions old).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from edgefl.trust import Opener, SealError, Signer, parse_sealed
from edgefl.wire.protocol import Receipt, Topics
from edgefl.wire import Update, UpdateDecodeError, decode_update

from .buffer import BufferConfig
from .influence import InfluenceBounds
from .rounds import OPEN, RoundState
from .store import ServerStore

log = logging.getLogger(__name__)

ACCEPTED, DUPLICATE, REJECTED, DROPPED = "accepted", "duplicate", "rejected", "dropped"

#: Most update messages judged and stored in one transaction (group commit: one fsync).
MAX_BATCH = 256
#: Unacknowledged updates the broker may have in flight to one ingesting session (the MQTT v5
#: Receive Maximum its CONNECT asks for). An update is acknowledged only after its batch was
#: committed, so the window must hold the batch being stored and the next one arriving:
#: Mosquitto's default of 20 capped every batch at 20 updates and ingestion at 20 per fsync.
RECEIVE_MAXIMUM = 4 * MAX_BATCH


@dataclass(frozen=True)
class Outcome:
    """What became of one update message.

    ``status`` is ``accepted`` (new, stored), ``duplicate`` (already stored: receipt again, not
    counted), ``rejected`` (receipt with the reason) or ``dropped`` (no receipt possible).
    ``client_id`` is the topic's client, where a receipt goes; ``update`` the decoded update when
    accepted.
    """

    status: str
    code: str = ""
    reason: str = ""
    client_id: str | None = None
    receipt: Receipt | None = None
    update: Update | None = None
    bounded: tuple[str, ...] = ()


class _Rejected(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class UpdateIngestor:
    """Validates and stores the updates of one fleet against the current round.

    Parameters
    ----------
    store : ServerStore
        Where accepted updates are written before they are acknowledged.
    topics : Topics
        The fleet's topics (to read the client id from an update topic).
    num_params : int
        Length of the global model's flat weight vector; updates of another length are malformed.
    max_update_bytes : int
        Payloads above this are dropped before decoding.
    bounds : InfluenceBounds
        The cap on claimed samples and the norm updates are clipped to (the defaults unless
        given).
    sealing_key : X25519PrivateKey or list of them, optional
        Updates must be sealed to it (:mod:`edgefl.trust.sealing`); None accepts plain updates
        (``--insecure``). A list holds the current key first, then one a key rotation replaced
        (see :meth:`set_sealing_keys`).
    """

    def __init__(self, store: ServerStore, topics: Topics, *, num_params: int,
                 max_update_bytes: int, bounds: InfluenceBounds | None = None,
                 sealing_key=None, buffer: BufferConfig | None = None):
        self.store = store
        self.topics = topics
        self.num_params = num_params
        self.max_update_bytes = max_update_bytes
        self.bounds = bounds if bounds is not None else InfluenceBounds()
        # (openers by key id, the current key's opener), swapped as one: see set_sealing_keys
        self._opener: tuple[dict[bytes, Opener], Opener] | None = None
        if sealing_key is not None:
            self.set_sealing_keys(sealing_key if isinstance(sealing_key, (list, tuple))
                                  else [sealing_key])
        self.buffer = buffer

    def set_sealing_keys(self, keys) -> None:
        """Open updates sealed to any of ``keys`` (the current sealing key first) from now on.

        A key rotation's grace period: devices that have not yet seen the rotation notice seal
        to the old key. Safe while another thread ingests (the openers are swapped at once).
        """
        openers = [Opener(k) for k in keys]
        if not openers:
            raise ValueError("at least one sealing key is needed")
        self._opener = ({o.key_id: o for o in openers}, openers[0])

    def _open(self, payload, client_id: str):
        """Open a sealed update with the opener of the key it names (the current one's error
        for a key this server does not hold)."""
        openers, current = self._opener
        parsed = parse_sealed(payload)
        opener = openers.get(parsed[0].recipient_key_id, current)
        return opener.open(payload, fleet=self.topics.fleet, client_id=client_id, parsed=parsed)

    def ingest(self, topic: str, payload: bytes, round_state: RoundState, *, now: float) -> Outcome:
        """Validate one update message against ``round_state`` and store it if it is accepted."""
        return self.ingest_batch([(topic, payload)], round_state, now=now)[0]

    def ingest_batch(self, messages, round_state: RoundState, *, now: float) -> list[Outcome]:
        """Judge ``(topic, payload)`` messages in order and store the accepted ones together.

        One transaction (one fsync) for the whole batch: group commit, so ingestion throughput
        is not bounded by the disk's sync latency. The outcomes are the same as ingesting the
        messages one by one; nothing may be acknowledged before this returns.
        """
        decoded = [self._decode(topic, payload) for topic, payload in messages]
        outcomes, rows = self._judge_all(decoded, round_state, self.store.find_update, now)
        if rows:
            self.store.add_updates(rows)
        return outcomes

    def ingest_batch_shared(self, messages, *, now: float) -> tuple[list[Outcome], RoundState]:
        """:meth:`ingest_batch` for one of several ingestion workers sharing the store.

        Returns the outcomes and the stored round they were judged against.

        Payloads are decoded first, outside any lock; then, in one write transaction of the
        store, the batch is judged against the round *as stored* (the coordinator may have
        closed it since) and the updates other workers accepted, and the accepted ones are
        stored. An update is thereby either stored before the coordinator freezes the round
        (:meth:`ServerStore.closing_round`) or judged against the next round: never both.
        """
        decoded = [self._decode(topic, payload) for topic, payload in messages]
        with self.store.shared_ingest() as tx:
            rounds: dict[int, set[str]] = {}
            for d in decoded:
                if isinstance(d, tuple):
                    rounds.setdefault(d[0].round_id, set()).add(d[1])
            known = {r: tx.stored(r, clients) for r, clients in rounds.items()}
            outcomes, rows = self._judge_all(decoded, tx.round,
                                             lambda r, c: known[r].get(c), now)
            tx.add(rows)
            rejected = Counter(o.code for o in outcomes if o.status in (REJECTED, DROPPED))
            if rejected:  # in the round's record however the round closes
                tx.count_rejected(rejected)
        return outcomes, tx.round

    def _judge_all(self, decoded, round_state, find, now):
        batch: dict[tuple[int, str], int] = {}  # (round, client) -> update id accepted in this batch
        outcomes, rows = [], []
        for d in decoded:
            if isinstance(d, Outcome):  # dropped before it could be judged
                outcomes.append(d)
                continue
            update, topic_client, payload = d
            outcome = self._judge(update, topic_client, round_state, batch, find)
            if outcome.status == ACCEPTED:
                batch[(update.round_id, update.client_id)] = update.update_id
                rows.append(dict(round_id=update.round_id, client_id=update.client_id,
                                 update_id=update.update_id, base_version=update.base_version,
                                 num_samples=update.num_samples, payload=bytes(payload),
                                 received_at=now))
            outcomes.append(outcome)
        return outcomes, rows

    def _decode(self, topic: str, payload: bytes):
        """``(update, topic client, payload)``, or the :class:`Outcome` of a dropped message."""
        topic_client = self.topics.client_of(topic)
        if len(payload) > self.max_update_bytes:
            return Outcome(DROPPED, "oversized",
                           f"{len(payload)} bytes exceed the limit of {self.max_update_bytes}; "
                           "send a sparser or quantized update, or raise --max-update-bytes",
                           topic_client)
        if topic_client is None or not topic.endswith("/update"):
            return Outcome(DROPPED, "bad_topic", f"topic {topic!r} is not an update topic of "
                                                 f"fleet {self.topics.fleet!r}")
        sealed_round = None
        if self._opener is not None:
            try:
                header, payload = self._open(payload, topic_client)
            except SealError as exc:
                return Outcome(DROPPED, "bad_seal", str(exc), topic_client)
            sealed_round = header.round_id
        try:
            update = decode_update(payload, expected_params=self.num_params,
                                   max_bytes=self.max_update_bytes)
        except UpdateDecodeError as exc:
            return Outcome(DROPPED, "malformed", f"undecodable update: {exc}", topic_client)
        if sealed_round is not None and sealed_round != update.round_id:
            return Outcome(DROPPED, "bad_seal", f"sealed for round {sealed_round} but the update "
                                                f"inside is for round {update.round_id}",
                           topic_client)
        return update, topic_client, payload

    def _judge(self, update: Update, topic_client: str, round_state: RoundState,
               batch: dict[tuple[int, str], int], find) -> Outcome:
        try:
            if update.client_id != topic_client:
                raise _Rejected("client_mismatch",
                                f"the update claims client {update.client_id!r} but was published "
                                f"on {topic_client!r}'s topic; a device may only send its own updates")
            stored_id = batch.get((update.round_id, topic_client))
            if stored_id is None:
                stored_id = find(update.round_id, topic_client)
            if stored_id == update.update_id:
                return Outcome(DUPLICATE, "", "", topic_client, _receipt(update, "accepted"))
            if stored_id is not None:
                raise _Rejected("conflict",
                                f"update {stored_id} of this client is already counted in round "
                                f"{update.round_id}; one update per client and round")
            self._check_round(update, round_state)
            self._check_values(update)
        except _Rejected as rej:
            return Outcome(REJECTED, rej.code, rej.reason, topic_client,
                           _receipt(update, "rejected", rej.reason))
        bounded, reasons = self.bounds.apply(update)
        return Outcome(ACCEPTED, "", "", topic_client, _receipt(update, "accepted"), bounded,
                       tuple(reasons))

    def _check_round(self, update: Update, r: RoundState) -> None:
        if update.round_id > r.round_id:
            raise _Rejected("unknown_round", f"round {update.round_id} has not started; the "
                                             f"current round is {r.round_id}")
        if self.buffer is not None:  # FedBuff: any recent version, from any device
            if r.phase != OPEN:
                raise _Rejected("round_not_open", f"round {r.round_id} is not open for updates "
                                                  f"({r.announcement().state})")
            reason = self.buffer.too_stale(update.base_version, r.model_version)
            if reason is not None:
                raise _Rejected("too_stale", reason)
            return
        if update.round_id == r.round_id - 1 >= 1:  # rounds count from 1
            raise _Rejected("late", f"round {update.round_id} closed before this update arrived; "
                                    f"the current round is {r.round_id}")
        if update.round_id < r.round_id:
            raise _Rejected("stale_round", f"stale round {update.round_id}: the current round is "
                                           f"{r.round_id}")
        if r.phase != OPEN:
            raise _Rejected("round_not_open", f"round {r.round_id} is not open for updates "
                                              f"({r.announcement().state})")
        if update.client_id not in r.selected_set:
            raise _Rejected("not_selected", f"client {update.client_id!r} is not selected for "
                                            f"round {r.round_id}")
        if update.base_version != r.model_version:
            raise _Rejected("wrong_model_version",
                            f"trained on model version {update.base_version}, but round "
                            f"{r.round_id} trains version {r.model_version}")

    def _check_values(self, update: Update) -> None:
        if update.num_samples <= 0:
            raise _Rejected("no_samples", "the update reports 0 training samples and would carry "
                                          "no weight")


def _receipt(update: Update, status: str, reason: str = "") -> Receipt:
    return Receipt(update.round_id, update.update_id, status, reason)


def answer_batch(conn, topics: Topics, messages, outcomes: list[Outcome], payload_sizes, *,
                 metrics, confirm: bool = False, publish_timeout: float = 10.0,
                 signer: Signer | None = None) -> int:
    """Acknowledge a judged batch to the broker and send its receipts; return the bytes sent.

    With ``signer`` each receipt is signed for the device it answers (``--insecure``: bare).

    Called only after :meth:`UpdateIngestor.ingest_batch` returned: an acknowledged update is
    on disk. Receipts go at QoS 0, which saves the PUBACK the server would handle for every
    update: a receipt only lets the device forget what the server already stored, so a lost one
    loses no update. The device keeps that update in its outbox a little longer: until an
    announcement shows it can no longer count (the next round's, in synchronous rounds; under
    buffered aggregation, one more than ``max_staleness`` versions ahead of its base), or until
    its resend (overdue receipt, restart of the device) is judged a duplicate and answered with
    the same receipt. With ``confirm`` (the batch ends the run: devices may stop listening once
    "finished" is announced) they go at QoS 1 and this waits until the broker confirmed them
    (one connection's messages are handled in order, so the last PUBACK confirms them all).
    """
    sent = 0
    last = max((i for i, o in enumerate(outcomes) if o.receipt is not None), default=-1)
    for i, (msg, outcome, size) in enumerate(zip(messages, outcomes, payload_sizes)):
        conn.ack(msg)
        metrics.count_update(size, None if outcome.status in (ACCEPTED, DUPLICATE) else outcome.code)
        if outcome.status == DROPPED:
            log.warning("dropped an update on %s (%s): %s", msg.topic, outcome.code, outcome.reason)
        elif outcome.status == DUPLICATE:
            log.info("duplicate update %d of %s for round %d: already counted",
                     outcome.receipt.update_id, outcome.client_id, outcome.receipt.round_id)
        elif outcome.status != ACCEPTED:
            log.warning("rejected update %d of %s for round %d (%s): %s",
                        outcome.receipt.update_id, outcome.client_id, outcome.receipt.round_id,
                        outcome.code, outcome.reason)
        if outcome.bounded:
            metrics.count_bounded(outcome.bounded)
            log.warning("update %d of %s for round %d bounded: %s", outcome.update.update_id,
                        outcome.client_id, outcome.update.round_id, ", ".join(outcome.bounded))
        if outcome.receipt is not None:
            payload = outcome.receipt.to_json()
            if signer is not None:
                payload = signer.sign("receipt", payload, subject=outcome.client_id)
            wait = confirm and i == last
            ok = conn.publish(topics.receipt(outcome.client_id), payload, qos=1 if confirm else 0,
                              timeout=publish_timeout if wait else None)
            sent += len(payload)
            if wait and not ok:
                log.warning("the broker did not confirm the last receipts in %gs; paho resends "
                            "them after reconnecting", publish_timeout)
    metrics.count_published(sent)
    return sent
