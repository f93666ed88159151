"""The device runtime: serve predictions, train when selected, send private compact updates.

:class:`EdgeClient` ties the device's parts together over one MQTT connection
(:class:`~edgefl.transport.mqtt.MqttConnection`):

* the **current model**: each retained model message is decoded, refused unless its version is
  newer and its ONNX bytes match their SHA-256, hot-swapped into the live
  :class:`~edgefl.device.predictor.Predictor`, and saved in the state directory, so a rebooted device
  serves its last model before it reaches the broker;
* **local training**: samples go into a :class:`~edgefl.device.trainer.LocalTrainer`; when a round
  announcement selects this device, a worker thread trains on the round's model version while
  predictions keep flowing;
* **privacy and compression**: :class:`~edgefl.device.update_pipeline.DeviceUpdates` turns the
  training delta into the update: the round's :class:`~edgefl.device.privacy.PrivacyPolicy`, paid
  from the device's own :class:`~edgefl.device.privacy.PrivacyAccountant` (persisted in the state
  directory), and a :class:`~edgefl.device.compression.Compressor` per setting (its
  error-feedback residual kept across rounds), in the order that keeps the guarantee; the status
  says which mechanisms the device takes part with, and when it cannot take part or declines a
  round;
* **trust** (:mod:`edgefl.trust`): every model, refresh, announcement, receipt and key notice
  must verify with the server key the device pins (its bundle's ``trust.json``), for this fleet,
  kind and device, and be no older than the last one of its kind acted on; anything else is
  refused with a log line and a counter (``refused_signature``, ``refused_misbound``,
  ``refused_replay``) and changes nothing, on disk or in memory. Each update is sealed to the
  server's key before it is stored. The age of the newest verified announcement is in
  :meth:`EdgeClient.stats` and the device's status; past ``freeze_after`` seconds the device
  logs a warning (a server that is down, or someone withholding its messages).
  ``insecure=True`` turns all of this off;
* **delivery**: the sealed update is stored in the :class:`~edgefl.device.outbox.Outbox` before
  it is published with QoS 1; the server's receipt removes it. An update whose receipt is
  overdue is published again, with back-off, whatever paho believes it delivered (a broker that
  crashed after acknowledging it has lost it); after a crash or reboot the device resends every
  stored update on connecting. The server counts each update once. An update is given up (with
  a log line) only when an announcement shows that it can no longer count
  (:func:`~edgefl.device.outbox.why_expired`): in synchronous rounds once a later round is
  announced; in rounds of buffered asynchronous aggregation (FedBuff, the announcement carries
  ``max_staleness``) only once its base model version is more than ``max_staleness`` versions
  behind the announced one, however many rounds passed, so an update in flight while the
  buffered rounds advance is still sent, kept and resent until its receipt. The same rule
  decides whether an update whose round advanced while it was being trained is sent at all.

Threads: the transport's dispatcher thread handles every incoming message (and never trains);
one worker thread trains and sends; any number of caller threads predict. No exception leaves a
message handler (the transport logs any that would).

A state directory belongs to one run of one fleet: the device never goes back to an older model
version and never trains a round it already answered, so after a server is reset to version 0,
give its devices fresh state directories. The privacy budget is the device's, not the run's: a
fresh state directory must not refill it, so point ``privacy_file`` (``--privacy-file``) at a path
that outlives state directories.

**Model refreshes** (``model_refresh``, on by default): the device reads the server's compressed
refreshes (:mod:`edgefl.wire.refresh`) and rebuilds each version from the one it holds, checked
against the weight hash in the refresh; it reads the retained full envelope only when it has no
model, when it missed a version (a refresh that does not apply, an announcement of a version it
does not hold), or when a refresh does not rebuild the server's model exactly, and unsubscribes
again once it is up to date.

State directory layout: ``model.bin`` (the last full model message, as signed), ``refreshes/``
(the refreshes applied on top of it, as signed, :mod:`edgefl.device.saved_model`),
``privacy.json`` (epsilon spent, unless ``privacy_file`` says elsewhere), ``state.json`` (the
last round this device sent an update for), ``trust.json`` (pinned keys after rotations, newest
sequences), ``outbox/``, and ``stats.json`` (written by :meth:`EdgeClient.write_stats`).
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from edgefl import __version__, kernels
from edgefl.durable import replace_file
from edgefl.device.local_data import all_labels_out_of_range, check_samples, describe_skipped
from edgefl.wire.model import ModelManifest
from edgefl.device.outbox import Outbox, why_expired
from edgefl.device.predictor import ModelRejected, Predictor, graph_optimization_level
from edgefl.device.privacy import PrivacyAccountant, PrivacyBudgetExhausted
from edgefl.wire.protocol import (
    LOCAL_MECHANISMS, MECHANISMS, DeviceStatus, ProtocolError, Receipt, RoundAnnouncement, Topics,
    check_name,
)
from edgefl.device.trainer import LocalTrainer
from edgefl.transport.mqtt import Message, MqttConnection
from edgefl.trust import (MessageMisbound, PinnedKeys, ReplayedMessage, SignatureInvalid,
                          TrustError)
from edgefl.device.update_pipeline import DeviceUpdates
from edgefl.device.saved_model import MAX_REFRESHES, SavedModel
from edgefl.wire import (
    DEFAULT_MAX_MODEL_BYTES, RefreshMismatch, decode_model, decode_refresh, encode_update,
)

log = logging.getLogger(__name__)

#: How long :meth:`EdgeClient.stop` waits for a running local training to finish.
STOP_TIMEOUT = 30.0
#: After resuming a persistent session, how long a device behind the announced version waits
#: for the refreshes the broker kept for it before it takes the full envelope (the broker may
#: deliver the retained announcement before the queued refreshes).
REFRESH_GRACE = 3.0
#: Longest wait between resends of an update whose receipt is overdue.
MAX_RESEND_DELAY = 600.0
#: How often the worker looks for overdue receipts and a frozen server, in seconds.
HOUSEKEEPING_INTERVAL = 1.0
_REFUSAL_COUNTERS = {SignatureInvalid: "refused_signature", MessageMisbound: "refused_misbound",
                     ReplayedMessage: "refused_replay"}


def _overtaken(new: RoundAnnouncement, current: RoundAnnouncement | None) -> bool:
    """Whether ``new`` is older than the ``current`` announcement, so it changes nothing.

    A run that stops before a round it already announced as coming ("closed", round N + 1: the
    privacy target of central DP allows no more) says "finished" with the last round that ran,
    N. That ends the run; it is not an announcement overtaken by the one of round N + 1.
    """
    if current is None or new.round_id >= current.round_id:
        return False
    return not (new.state == "finished" and current.state == "closed"
                and new.round_id == current.round_id - 1)


class NoModelYet(RuntimeError):
    """The device has not received a global model yet, so it cannot predict."""


class EdgeClient:
    """One device of a fleet.

    Parameters
    ----------
    client_id : str
        The device's fixed id (also its MQTT client id).
    fleet : str
        The fleet it belongs to.
    broker_url : str
        ``mqtt://host:port`` or ``mqtts://host:port``.
    state_dir : path
        Where the device keeps what must survive a reboot (see the module docstring).
    username, password, tls, ca_certs
        Passed to :class:`~edgefl.transport.mqtt.MqttConnection`.
    trust : path or PinnedKeys
        The server keys this device pins: the ``trust.json`` of its bundle (``edgefl fleet
        add-device``), kept up to date (rotations, sequences) in ``state_dir/trust.json``.
        Required unless ``insecure``.
    insecure : bool
        Accept unsigned server messages and send updates unsealed (plain test brokers only);
        logs a warning.
    freeze_after : float
        Seconds without a fresh verified round announcement after which the device warns that
        it may be frozen.
    receipt_timeout : float
        Seconds after which an update without a receipt is published again (then doubling, up
        to :data:`MAX_RESEND_DELAY`).
    privacy_budget : float
        Total replace-one epsilon this device will ever spend on local DP (basic composition);
        once spent it sends no more updates. It counts only in rounds whose announced mechanism
        adds noise on the device (central DP is accounted by the server).
    privacy_delta_budget : float
        Total delta it will ever spend (local Gaussian rounds spend their delta).
    privacy_file : path, optional
        Where the spent epsilon is kept; ``state_dir/privacy.json`` by default.
    require_privacy : bool
        Take part only in rounds with differential privacy on: the mechanism is the server's
        announcement, so a device that must never send a clean update says so here and declines
        every round announced with ``privacy: none``. (``central-gaussian`` counts as private: the
        device trusts the aggregator with its clipped update.)
    accept_mechanisms : iterable of str, optional
        The privacy mechanisms this device takes part with (default: every one it implements,
        :data:`edgefl.wire.protocol.MECHANISMS`). They go into its status, so the server selects it
        only for rounds announcing one of them; selected for another, it declines in its status.
    capacity : int
        Most local training samples kept (a ring buffer: the newest stay).
    seed : int
        Seed of minibatch shuffling. Privacy noise never uses it: it draws from fresh OS entropy,
        so nobody who knows the seed can subtract the noise.
    intra_op_threads : int
        onnxruntime threads per prediction.
    graph_optimization : str
        onnxruntime graph optimization level, see :class:`~edgefl.device.predictor.Predictor`.
    max_model_bytes : int
        Larger model messages are refused unread.
    outbox_entries : int
        Most updates kept waiting for their receipts (storing one more drops the oldest); under
        buffered aggregation updates of several rounds may wait at once.
    reconnect_delay, keepalive, session_expiry
        Passed to the transport.
    model_refresh : bool
        Follow the server's compressed refreshes (``edgefl/<fleet>/refresh``) and read the full
        model envelope only when new, behind, or a refresh did not rebuild the server's model
        exactly; False reads every full envelope.

    Attributes
    ----------
    finished : threading.Event
        Set once the server announced that the last round is over and this device serves the
        final model.
    training : threading.Event
        Set while the worker handles a round: from taking it until its update is sent or the
        round skipped.
    """

    def __init__(self, client_id: str, fleet: str, broker_url: str, state_dir, *,
                 username: str | None = None, password: str | None = None, tls=None,
                 ca_certs: str | None = None, privacy_budget: float = 100.0,
                 privacy_delta_budget: float = 1e-5, privacy_file=None,
                 require_privacy: bool = False, accept_mechanisms=None,
                 capacity: int = 100_000, seed: int = 0, intra_op_threads: int = 1,
                 graph_optimization: str = "basic",
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES, outbox_entries: int = 16,
                 reconnect_delay=(0.5, 30), keepalive: int = 30, session_expiry: int = 86400,
                 model_refresh: bool = True, trust=None, insecure: bool = False,
                 freeze_after: float = 900.0, receipt_timeout: float = 30.0):
        self.client_id = check_name("client id", client_id)
        self.topics = Topics(fleet)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if trust is None and not insecure:
            raise ValueError(
                f"device {client_id}: no server keys to verify messages with; pass the bundle's "
                "trust.json (edgefl client --bundle DIR, from `edgefl fleet add-device`), or "
                "insecure=True (--insecure) for a plain test broker")
        if trust is not None and not isinstance(trust, PinnedKeys):
            trust = PinnedKeys.from_trust_file(trust, fleet=fleet,
                                               path=self.state_dir / "trust.json")
        self._trust: PinnedKeys | None = None if insecure else trust
        if insecure:
            log.warning("%s: INSECURE: server messages are not verified and updates are not "
                        "sealed; anyone who can publish on the broker can steer this device",
                        client_id)
        self.freeze_after = float(freeze_after)
        self.receipt_timeout = float(receipt_timeout)
        self.capacity = capacity
        self.seed = seed
        self.intra_op_threads = intra_op_threads
        graph_optimization_level(graph_optimization)  # a bad name fails now, not on a model
        self.graph_optimization = graph_optimization
        self.max_model_bytes = max_model_bytes
        self.finished = threading.Event()
        self.training = threading.Event()

        self._lock = threading.RLock()  # guards the fields below that two threads touch
        self._work = threading.Condition(self._lock)
        self._train_lock = threading.Lock()  # the trainer's buffer: add() vs train()
        self._predictor: Predictor | None = None
        self._trainer: LocalTrainer | None = None
        self._pending_data: list[tuple] = []  # (X, y, lines) until the first model arrives
        self._trained_graph = b""  # onnx_sha256 of the graph whose features the trainer holds
        self._announced_samples: bool | None = None  # whether the last status said samples > 0
        self._announcement: RoundAnnouncement | None = None
        self._job: tuple[RoundAnnouncement, object] | None = None
        self._scheduled_round = -1
        # Outbox entries published by this process: (round, update id) -> (next resend, delay).
        self._handed: dict[tuple[int, int], tuple[float, float]] = {}
        self._announcement_seen_at = time.monotonic()  # of the newest verified announcement
        self._announcement_sequence = -1
        self._freeze_logged = False
        self._stopping = False
        self._worker: threading.Thread | None = None
        self.swaps: deque[tuple[float, float]] = deque(maxlen=1024)  # perf_counter (start, end)
        # Changed by the MQTT dispatcher thread (models, receipts) and the training worker (rounds,
        # updates), read by stats(): every change and read holds this lock.
        self._counters_lock = threading.Lock()
        self.counters = dict(updates_sent=0, accepted=0, rejected=0, bytes_up=0, bytes_down=0,
                             models_installed=0, models_refused=0, rounds_skipped=0,
                             refreshes_applied=0, refresh_fallbacks=0,
                             refused_signature=0, refused_misbound=0, refused_replay=0,
                             updates_resent=0, announcements=0)
        self.last_loss: float | None = None
        self.rejections: list[str] = []

        self.require_privacy = require_privacy
        accepted = tuple(MECHANISMS if accept_mechanisms is None else accept_mechanisms)
        unknown = sorted(set(accepted) - set(MECHANISMS))
        if unknown:
            raise ValueError(f"unknown privacy mechanism(s) {', '.join(unknown)}: this device "
                             f"implements {', '.join(MECHANISMS)}")
        self.accept_mechanisms = tuple(m for m in accepted if not (require_privacy and m == "none"))
        self._unavailable = ""  # why this device cannot take part in any round, if it cannot
        privacy_file = Path(privacy_file) if privacy_file else self.state_dir / "privacy.json"
        privacy_file.parent.mkdir(parents=True, exist_ok=True)
        self._accountant = PrivacyAccountant(privacy_budget, delta_budget=privacy_delta_budget,
                                             path=privacy_file)
        # Float noise from fresh OS entropy, never the user's seed.
        self._updates = DeviceUpdates(self.client_id, self._accountant, np.random.default_rng())
        self._outbox = Outbox(self.state_dir / "outbox", max_entries=outbox_entries)
        self._last_round = self._load_state().get("last_round", -1)
        self.model_refresh = bool(model_refresh)
        self._saved = SavedModel(self.state_dir)
        self._load_saved_model()
        # Following refreshes, the full envelope is read only while this is True.
        self._wants_full = not self.model_refresh or self._predictor is None
        self._session_resumed_at: float | None = None  # monotonic time of the last resume
        self._catch_up_timer: threading.Timer | None = None

        self._conn = MqttConnection(
            self.client_id, broker_url, username=username, password=password, tls=tls,
            ca_certs=ca_certs, session_expiry=session_expiry, keepalive=keepalive,
            will=(self.topics.status(self.client_id), DeviceStatus("offline").to_json(), 1, True),
            # The key notice first: the broker sends retained messages in the order of the
            # subscriptions, and a device that missed a rotation must read the notice before
            # the retained model and announcement signed with the new key.
            subscriptions=([(self.topics.key, 1)] if self._trust is not None else [])
            + ([(self.topics.model, 1)] if self._wants_full else [])
            + ([(self.topics.refresh, 1)] if self.model_refresh else [])
            + [(self.topics.round, 1), (self.topics.receipt(self.client_id), 1)],
            on_message=self._on_message, reconnect_delay=reconnect_delay,
        )
        self._conn.on_connect_hooks.append(self._on_connected)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "EdgeClient":
        """Start the training worker and connect (raises ``BrokerUnreachable`` after ``timeout``)."""
        self._stopping = False
        self._worker = threading.Thread(target=self._work_loop, name=f"edgefl-train-{self.client_id}",
                                        daemon=True)
        self._worker.start()
        try:
            self._conn.start(timeout=timeout)
        except BaseException:
            self._stop_worker()
            raise
        return self

    def stop(self) -> None:
        """Finish a running training (up to :data:`STOP_TIMEOUT`), say "offline", disconnect.

        Updates not yet acknowledged stay in the outbox and are sent on the next start.
        """
        self._stop_worker()
        if self._conn.connected.is_set():
            self._conn.publish(self.topics.status(self.client_id),
                               DeviceStatus("offline").to_json(), qos=1, retain=True, timeout=2.0)
        self._conn.stop()

    def _stop_worker(self) -> None:
        with self._lock:
            self._stopping = True
            self._work.notify_all()
            if self._catch_up_timer is not None:
                self._catch_up_timer.cancel()
                self._catch_up_timer = None
        if self._worker is not None:
            self._worker.join(STOP_TIMEOUT)
            self._worker = None

    def __enter__(self) -> "EdgeClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def connected(self) -> threading.Event:
        """Set while connected to the broker."""
        return self._conn.connected

    # -- serving and data ------------------------------------------------------------------------

    @property
    def model_version(self) -> int | None:
        """Version of the model predictions come from, or None before the first model."""
        predictor = self._predictor
        return None if predictor is None else predictor.version

    @property
    def predictor(self) -> Predictor | None:
        return self._predictor

    def predict(self, x) -> np.ndarray:
        """Class probabilities from the live model for one sample ``(d,)`` or a batch ``(m, d)``.

        Raises
        ------
        NoModelYet
            Before the first global model arrived.
        """
        predictor = self._predictor
        if predictor is None:
            raise NoModelYet(f"device {self.client_id} has no global model yet: it serves "
                             "predictions once the server's retained model arrived")
        return predictor.predict(x)

    def add_data(self, X, y, *, lines=None) -> int:
        """Add labelled local samples for training (kept on the device, never sent).

        Every row is checked against the model: a row with a NaN/Inf feature or a label that is
        not one of the model's classes is skipped with a log line naming it (by its entry in
        ``lines``, e.g. its line in a data file, else its position from 1); the other rows are
        added. Before the first model arrives the samples wait and are checked when it does.

        Returns
        -------
        int
            Samples added now (0 while waiting for the first model).

        Raises
        ------
        ValueError
            Once a model is known, for samples of another width than the model's input (which
            concerns every row).
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        y = np.asarray(y)
        with self._lock:
            trainer = self._trainer
            if trainer is None:
                self._pending_data.append((X, y, lines))
                return 0
        X, y = self._fitting_rows(trainer.manifest, X, y, lines)
        if len(y):
            with self._train_lock:
                trainer.add(X, y)
            self._status_if_samples_changed()
        return len(y)

    def _fitting_rows(self, manifest: ModelManifest, X, y, lines):
        """The rows of ``(X, y)`` that fit ``manifest``; the others are logged and left out."""
        keep, skipped = check_samples(X, y, input_width=manifest.input_width,
                                      num_classes=manifest.num_classes, lines=lines)
        if skipped:
            log.warning("%s: %s", self.client_id, describe_skipped(skipped, "local samples"))
            if all_labels_out_of_range(y, manifest.num_classes):
                log.error("%s: not one of its %d labels is a class of the model (0..%d): this "
                          "device has nothing to train on; relabel its data to the model's "
                          "classes", self.client_id, len(y), manifest.num_classes - 1)
        return X[keep], np.asarray(y)[keep].astype(np.int32)

    @property
    def num_samples(self) -> int:
        """Local samples available for training."""
        trainer = self._trainer
        if trainer is not None:
            return trainer.num_samples
        return sum(len(y) for _, y, _ in self._pending_data)

    @property
    def privacy_spent(self) -> float:
        return self._accountant.spent_epsilon

    @property
    def privacy_remaining(self) -> float:
        return self._accountant.remaining

    @property
    def outbox(self) -> Outbox:
        return self._outbox

    def stats(self) -> dict:
        """What the device did: counters, model version, privacy spent, prediction latency."""
        predictor = self._predictor
        latency = None
        if predictor is not None:
            s = predictor.stats()
            latency = {"count": s.count, "p50_us": s.p50_us, "p99_us": s.p99_us}
        return {
            "client_id": self.client_id, "model_version": self.model_version,
            "last_round": self._last_round, "samples": self.num_samples,
            "privacy_spent": self.privacy_spent, "privacy_remaining": self.privacy_remaining,
            "outbox": len(self._outbox), "last_loss": self.last_loss, "predictor": latency,
            "announcement_age_s": round(self.announcement_age, 3),
            "secure": self._trust is not None,
            "signing_key": None if self._trust is None else self._trust.signing_key_id,
            "refused_publishes": self._conn.refused_publishes,
            **self._counted(),
        }

    def _count(self, name: str, amount: int = 1) -> None:
        with self._counters_lock:
            self.counters[name] += amount

    def _counted(self) -> dict:
        """A consistent copy of the counters and the last rejections."""
        with self._counters_lock:
            return {"rejections": list(self.rejections[-20:]), **self.counters}

    @property
    def announcement_age(self) -> float:
        """Seconds since the newest verified round announcement arrived (since start before the
        first): grows while the server is down or its messages are withheld or replayed."""
        return time.monotonic() - self._announcement_seen_at

    def write_stats(self, extra: dict | None = None) -> Path:
        """Write :meth:`stats` (plus ``extra``) to ``state_dir/stats.json`` atomically."""
        path = self.state_dir / "stats.json"
        replace_file(path, json.dumps({**self.stats(), **(extra or {})}, indent=1).encode())
        return path

    # -- persistence -----------------------------------------------------------------------------

    def _load_state(self) -> dict:
        path = self.state_dir / "state.json"
        if not path.exists():
            return {}
        try:
            state = json.loads(path.read_text())
            int(state["last_round"])
            return state
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Losing it only risks training a round twice; the server rejects the second update.
            log.warning("%s is unreadable (%s); starting without it", path, exc)
            return {}

    def _load_saved_model(self) -> None:
        try:
            # Its own saved copies, so no replay check, but the signatures still: the state
            # directory is not trusted more than the network.
            model = self._saved.load(
                lambda data: decode_model(self._saved_payload(data, "model"),
                                          max_bytes=self.max_model_bytes),
                lambda data: decode_refresh(self._saved_payload(data, "refresh")))
            if model is None:
                return
            predictor = Predictor(model, intra_op_threads=self.intra_op_threads,
                                  graph_optimization=self.graph_optimization)
        except (OSError, ValueError) as exc:  # ModelDecodeError, ModelRejected are ValueErrors
            log.warning("the saved model %s is unusable (%s); waiting for the server's",
                        self._saved.path, exc)
            return
        self._predictor = predictor
        self._ensure_trainer(model)
        log.info("%s: serving the saved model version %d", self.client_id, model.version)

    # -- messages (dispatcher thread) ------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        payload = bytes(msg.payload)
        self._count("bytes_down", len(payload))
        if msg.topic == self.topics.model:
            self._on_model(payload)
        elif msg.topic == self.topics.refresh:
            self._on_refresh(payload)
        elif msg.topic == self.topics.round:
            self._on_round(payload)
        elif msg.topic == self.topics.receipt(self.client_id):
            self._on_receipt(payload)
        elif msg.topic == self.topics.key and self._trust is not None:
            self._on_key(payload)
        else:
            log.warning("%s: ignoring a message on unexpected topic %s", self.client_id, msg.topic)

    def _verified(self, payload: bytes, kind: str, subject: str = ""):
        """``(signed message or None, inner payload)`` of a server message, or None if refused."""
        if self._trust is None:
            return None, payload
        try:
            message = self._trust.verify(payload, kind, subject=subject)
        except TrustError as exc:
            self._count(_REFUSAL_COUNTERS.get(type(exc), "refused_signature"))
            log.warning("%s: refused a %s message of %d bytes: %s", self.client_id, kind,
                        len(payload), exc)
            return None
        return message, message.payload

    def _saved_payload(self, data: bytes, kind: str) -> bytes:
        """The payload of a signed message this device saved (its signature checked again; one
        saved before a key rotation verifies with the key the rotation replaced)."""
        if self._trust is None:
            return data
        return self._trust.open_saved(data, kind).payload

    def _accept(self, message) -> None:
        if message is None:
            return
        try:
            self._trust.accept(message)
        except OSError as exc:
            log.warning("%s: could not save the trust state (%s); replay protection restarts "
                        "from the last saved state after a reboot", self.client_id, exc)

    def _status(self, declined: dict | None = None) -> DeviceStatus:
        """The retained status: capabilities, whether it can take part, what it declined."""
        unavailable = self._unavailable or ("" if self.num_samples else "no local samples")
        caps = {
            "edgefl": __version__, "kernels": kernels.BACKEND, "samples": self.num_samples,
            "model_version": self.model_version, "mechanisms": list(self.accept_mechanisms),
            "privacy_remaining": round(self.privacy_remaining, 6),
            "privacy_delta_remaining": self._accountant.remaining_delta,
            "privacy_guarantee": "local: replace-one epsilon, basic composition",
            "available": not unavailable,
            "announcement_age_s": round(self.announcement_age, 1),
            "secure": self._trust is not None,
        }
        if self._trust is not None:
            # Which server key the device follows: the operator sees who has read a rotation
            # notice before finishing the rotation.
            caps["signing_key"] = self._trust.signing_key_id
        if unavailable:
            caps["unavailable"] = unavailable
        if declined is not None:
            caps["declined"] = declined
        return DeviceStatus("online", caps)

    def _publish_status(self, declined: dict | None = None) -> None:
        """Say "online" with what the device can do (``samples: 0`` and ``available: false``
        keep it out of rounds), and what it declined."""
        status = self._status(declined)
        self._announced_samples = status.capabilities["samples"] > 0
        self._conn.publish(self.topics.status(self.client_id), status.to_json(), qos=1, retain=True)

    def _status_if_samples_changed(self) -> None:
        """Announce again when the device gains its first samples or loses its last ones (all of
        them refused by a model), so the server selects only devices that can train."""
        if self._conn.connected.is_set() and (self.num_samples > 0) != self._announced_samples:
            self._publish_status()

    def _decline(self, a: RoundAnnouncement, reason: str) -> None:
        """Tell the server (status) that this device will not answer round ``a``, and why."""
        self._count("rounds_skipped")
        self._scheduled_round = max(self._scheduled_round, a.round_id)
        log.warning("%s: round %d: %s; declined (in the status)", self.client_id, a.round_id,
                    reason)
        self._publish_status({"round_id": a.round_id, "reason": reason})

    def _on_connected(self, session_present: bool) -> None:
        self._session_resumed_at = time.monotonic() if session_present else None
        self._publish_status()
        # Updates stored by an earlier process (crash, reboot) were never handed to this paho
        # client; those handed over already are resent when their receipt is overdue.
        for entry in self._outbox.entries():
            if (entry.round_id, entry.update_id) not in self._handed:
                try:
                    payload = self._outbox.read(entry)
                except FileNotFoundError:  # removed meanwhile (a receipt, or evicted)
                    continue
                log.info("%s: resending update %d of round %d from the outbox",
                         self.client_id, entry.update_id, entry.round_id)
                self._send(entry.round_id, entry.update_id, payload)

    def _on_key(self, payload: bytes) -> None:
        before = self._trust.signing_key_id
        try:
            self._trust.rotate(payload)
        except TrustError as exc:
            self._count(_REFUSAL_COUNTERS.get(type(exc), "refused_signature"))
            log.warning("%s: refused a key rotation notice: %s", self.client_id, exc)
        except OSError as exc:
            log.error("%s: could not save the rotated keys (%s)", self.client_id, exc)
        else:
            if self._trust.signing_key_id != before and self._conn.connected.is_set():
                self._publish_status()  # it names the key now followed

    def _decoded(self, decode, payload: bytes, what: str):
        """``decode(payload)``, or None (counted and logged) for a malformed message."""
        try:
            return decode(payload)
        except ValueError as exc:
            self._count("models_refused")
            log.warning("%s: ignoring a %s of %d bytes: %s", self.client_id, what, len(payload),
                        exc)
            return None

    def _on_model(self, frame: bytes) -> None:
        verified = self._verified(frame, "model")
        if verified is None:
            return
        message, payload = verified
        model = self._decoded(lambda data: decode_model(data, max_bytes=self.max_model_bytes),
                              payload, "model message")
        if model is None:
            return
        current = self._predictor
        if current is not None and model.version <= current.version:
            log.debug("%s: model version %d is not newer than %d", self.client_id, model.version,
                      current.version)
            if model.version == current.version and \
                    model.weights.tobytes() == current.model.weights.tobytes():
                try:  # the same model as a full envelope: the saved refreshes can go
                    self._saved.save_full(frame)
                except OSError as exc:
                    log.warning("%s: could not save model version %d (%s)", self.client_id,
                                model.version, exc)
            self._full_received()
            if model.version == current.version:
                self._accept(message)  # the same model, signed again (a republish)
            return
        if self._install(model, lambda: self._saved.save_full(frame)):
            self._accept(message)
            self._full_received()

    def _full_received(self) -> None:
        """Following refreshes, stop reading full envelopes once the device holds the version
        the newest announcement names (the retained envelope arrives on every subscription)."""
        with self._lock:
            if not (self.model_refresh and self._wants_full):
                return
            current, announced = self._predictor, self._announcement
            if current is None or (announced is not None
                                   and current.version < announced.model_version):
                return  # the model named by the announcement has not arrived yet
            self._wants_full = False
        self._conn.unsubscribe(self.topics.model)

    def _want_full(self, reason: str) -> None:
        """Read the retained full model envelope (once), because of ``reason``."""
        with self._lock:
            if self._wants_full:
                return
            self._wants_full = True
        self._count("refresh_fallbacks")
        log.info("%s: %s; taking the full model envelope", self.client_id, reason)
        self._conn.subscribe(self.topics.model)

    def _check_behind(self, *, waited: bool = False) -> None:
        """Take the full envelope if the announced version is newer than the one held.

        The server publishes a version's refresh before the announcement that names it, so
        being behind means a refresh was missed, unless the device has just resumed its
        session: then the broker may still be delivering the refreshes it kept, and the device
        gives them :data:`REFRESH_GRACE` seconds first.
        """
        with self._lock:
            current, announced = self._predictor, self._announcement
            if not self.model_refresh or current is None or announced is None \
                    or announced.model_version <= current.version:
                return
            resumed = self._session_resumed_at
            if not waited and resumed is not None \
                    and time.monotonic() - resumed < REFRESH_GRACE:
                if self._catch_up_timer is None:
                    self._catch_up_timer = threading.Timer(REFRESH_GRACE, self._catch_up_later)
                    self._catch_up_timer.daemon = True
                    self._catch_up_timer.start()
                return
            self._want_full(f"the server is at version {announced.model_version}, this device "
                            f"at {current.version}")

    def _catch_up_later(self) -> None:
        try:
            with self._lock:
                self._catch_up_timer = None
            self._check_behind(waited=True)
        except Exception:  # noqa: BLE001 - a timer thread must not die silently
            log.exception("%s: checking for missed model versions failed", self.client_id)

    def _on_refresh(self, frame: bytes) -> None:
        verified = self._verified(frame, "refresh")
        if verified is None:
            return
        message, payload = verified
        refresh = self._decoded(decode_refresh, payload, "model refresh")
        if refresh is None:
            return
        current = self._predictor
        if current is None or refresh.version <= current.version:
            return  # no base to apply it to (the full envelope is on its way), or not newer
        if refresh.base_version != current.version:
            self._want_full(f"refresh {refresh.base_version} -> {refresh.version} does not apply "
                            f"to version {current.version} (versions were missed)")
            return
        model = current.model
        try:
            if refresh.onnx_sha256 != model.onnx_sha256:
                raise RefreshMismatch("the refresh is for another graph")
            weights = refresh.apply(model.weights)
        except RefreshMismatch as exc:
            self._want_full(f"refresh to version {refresh.version} refused: {exc}")
            return
        model = model.with_weights(weights, version=refresh.version, round_id=refresh.round_id)

        def save():
            if self._saved.refresh_count >= MAX_REFRESHES:
                # Re-anchor on a full envelope now and then, which bounds what start-up rebuilds.
                self._want_full(f"{MAX_REFRESHES} refreshes since the last full model")
            self._saved.save_refresh(refresh.version, frame)

        if self._install(model, save):
            self._accept(message)
            self._count("refreshes_applied")

    def _install(self, model, save) -> bool:
        """Swap ``model`` in (the first one builds the predictor), ``save()`` it, schedule."""
        current = self._predictor
        started = time.perf_counter()
        try:
            if current is None:
                predictor = Predictor(model, intra_op_threads=self.intra_op_threads,
                                      graph_optimization=self.graph_optimization)
            else:
                current.swap(model)
        except ModelRejected as exc:
            self._count("models_refused")
            log.warning("%s: refused model version %d: %s", self.client_id, model.version, exc)
            return False
        self.swaps.append((started, time.perf_counter()))
        self._count("models_installed")
        try:
            save()
        except OSError as exc:
            log.warning("%s: could not save model version %d (%s); it serves it anyway",
                        self.client_id, model.version, exc)
        with self._lock:
            if current is None:
                self._predictor = predictor
            self._ensure_trainer(model)
            self._status_if_samples_changed()
            self._schedule()
            self._check_finished()
        log.info("%s: now serving model version %d", self.client_id, model.version)
        return True

    def _on_round(self, frame: bytes) -> None:
        verified = self._verified(frame, "round")
        if verified is None:
            return
        message, payload = verified
        try:
            announcement = RoundAnnouncement.from_json(payload)
        except ProtocolError as exc:
            log.warning("%s: ignoring a round announcement: %s", self.client_id, exc)
            return
        sequence = message.sequence if message is not None else self._announcement_sequence + 1
        if sequence > self._announcement_sequence:  # fresh, not the same one delivered again
            self._announcement_sequence = sequence
            self._announcement_seen_at = time.monotonic()
            if self._freeze_logged:
                log.info("%s: fresh round announcements arrive again", self.client_id)
            self._freeze_logged = False
        with self._lock:
            if _overtaken(announcement, self._announcement):
                return
            self._announcement = announcement
        self._accept(message)
        self._check_behind()
        for entry in self._outbox.expire(announcement):
            self._handed.pop((entry.round_id, entry.update_id), None)
        with self._lock:
            self._schedule()
            self._check_finished()
            # Counted once decided on: a training job it starts is queued by now.
            self._count("announcements")

    def _on_receipt(self, frame: bytes) -> None:
        verified = self._verified(frame, "receipt", subject=self.client_id)
        if verified is None:
            return
        try:
            receipt = Receipt.from_json(verified[1])
        except ProtocolError as exc:
            log.warning("%s: ignoring a receipt: %s", self.client_id, exc)
            return
        if receipt.status == "accepted":
            self._count("accepted")
            log.info("%s: round %d: update %d accepted", self.client_id, receipt.round_id,
                     receipt.update_id)
        else:
            self._count("rejected")
            with self._counters_lock:
                self.rejections.append(f"round {receipt.round_id}: {receipt.reason}")
            log.warning("%s: round %d: update %d rejected by the server: %s", self.client_id,
                        receipt.round_id, receipt.update_id, receipt.reason)
        self._outbox.remove(receipt.round_id, receipt.update_id)
        self._handed.pop((receipt.round_id, receipt.update_id), None)

    # -- rounds ----------------------------------------------------------------------------------

    def _ensure_trainer(self, model) -> None:
        """Make the trainer fit ``model`` (lock held), feeding it the waiting samples.

        The trainer caches the frozen extractor's features of every sample; a model with
        another graph (``onnx_sha256``) may have another extractor, so its features are
        computed anew; a head of another shape gets a new trainer with the stored samples.
        """
        manifest = model.manifest
        trainer = self._trainer
        featurizer = self._predictor.features if manifest.features_name else None
        if trainer is not None and trainer.manifest == manifest:
            if featurizer is not None and self._trained_graph != model.onnx_sha256:
                with self._train_lock:  # not during a round: it would train on mixed features
                    trainer.set_featurizer(featurizer)
                log.info("%s: the model's graph changed; recomputed the features of %d local "
                         "samples", self.client_id, trainer.num_samples)
            self._trained_graph = model.onnx_sha256
            return
        pending, self._pending_data = self._pending_data, []
        if trainer is not None:
            X, y = trainer.raw_samples()
            pending.insert(0, (X, y, None))
            log.info("%s: the model's head changed shape; its %d local samples move to the new "
                     "head's trainer", self.client_id, len(y))
        self._trainer = LocalTrainer(manifest, capacity=self.capacity, seed=self.seed,
                                     featurizer=featurizer)
        self._trained_graph = model.onnx_sha256
        for X, y, lines in pending:
            try:
                X, y = self._fitting_rows(manifest, X, y, lines)
            except ValueError as exc:
                log.error("%s: dropped %d local samples that do not fit the model: %s",
                          self.client_id, len(y), exc)
                continue
            if len(y):
                self._trainer.add(X, y)

    def _schedule(self) -> None:
        """Hand the current round to the worker if this device should take part (lock held)."""
        a = self._announcement
        predictor = self._predictor
        if a is None or not a.is_selected(self.client_id) or predictor is None:
            return
        if a.round_id <= max(self._last_round, self._scheduled_round):
            return  # already took part, or declined (perhaps before a reboot)
        policy = a.config.privacy
        if policy.mechanism not in self.accept_mechanisms:
            why = ("this device requires differential privacy (--require-privacy)"
                   if policy.mechanism == "none" and self.require_privacy else
                   "this edgefl version does not implement it" if policy.mechanism not in MECHANISMS
                   else "this device does not accept it")
            self._decline(a, f"privacy mechanism {policy.mechanism!r} is not supported: {why} "
                             f"(it takes part with {', '.join(self.accept_mechanisms)})")
            return
        if self._budget_spent(a):
            self._decline(a, self._unavailable + "; this device sends no more updates")
            return
        if self.num_samples == 0:
            self._decline(a, "no local samples to train on")
            return
        if predictor.version != a.model_version:
            return  # the round's model has not arrived yet (it comes on the model topic)
        self._scheduled_round = a.round_id
        self._job = (a, predictor.model)
        self._work.notify_all()

    def _budget_spent(self, a: RoundAnnouncement) -> bool:
        """Whether the budget cannot pay for an update of round ``a``; if so, say why in the
        status from now on (the server stops selecting this device)."""
        p = a.config.privacy
        if p.mechanism not in LOCAL_MECHANISMS or self._accountant.can_spend(
                p.epsilon, p.delta if p.mechanism == "gaussian" else 0.0):
            return False
        acc = self._accountant
        self._unavailable = (
            f"privacy budget spent: epsilon {acc.spent_epsilon:.6g} of {acc.budget:.6g}, delta "
            f"{acc.spent_delta:.3g} of {acc.delta_budget:.3g} (replace-one, basic composition)")
        return True

    def _check_finished(self) -> None:
        a = self._announcement
        if a is not None and a.state == "finished" and self.model_version is not None \
                and self.model_version >= a.model_version:
            self.finished.set()

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                if self._job is None and not self._stopping:
                    self._work.wait(HOUSEKEEPING_INTERVAL)
                if self._stopping:
                    return
                job, self._job = self._job, None
                if job is not None:  # set as it is taken: a job is always queued or training
                    self.training.set()
            if job is None:
                try:
                    self._housekeeping()
                except Exception:  # noqa: BLE001 - housekeeping must not end the worker
                    log.exception("%s: housekeeping failed", self.client_id)
                continue
            announcement, model = job
            try:
                self._take_part(announcement, model)
            except PrivacyBudgetExhausted as exc:
                log.warning("%s: round %d: %s", self.client_id, announcement.round_id, exc)
            except Exception:  # noqa: BLE001 - one failed round must not end the device
                self._count("rounds_skipped")
                log.exception("%s: round %d: local training or encoding failed; no update sent",
                              self.client_id, announcement.round_id)
            finally:
                self.training.clear()

    def _housekeeping(self) -> None:
        """Resend updates whose receipt is overdue; warn once when announcements stop."""
        if self.connected.is_set():
            now = time.monotonic()
            for entry in self._outbox.entries():
                key = (entry.round_id, entry.update_id)
                due = self._handed.get(key)
                if due is None or due[0] > now:
                    continue
                try:
                    payload = self._outbox.read(entry)
                except FileNotFoundError:  # a receipt removed it meanwhile
                    continue
                delay = min(2 * due[1], MAX_RESEND_DELAY)
                log.info("%s: no receipt for update %d of round %d after %.0f s; sending it "
                         "again (next try in %.0f s)", self.client_id, entry.update_id,
                         entry.round_id, due[1], delay)
                self._count("updates_resent")
                self._send(entry.round_id, entry.update_id, payload, delay=delay)
        age = self.announcement_age
        if age > self.freeze_after and not self._freeze_logged:
            self._freeze_logged = True
            log.warning("%s: no fresh verified round announcement for %.0f s (bound %.0f s): the "
                        "server is down or unreachable, or someone withholds or replays its "
                        "messages; this device keeps serving model version %s", self.client_id,
                        age, self.freeze_after, self.model_version)
            if self.connected.is_set():
                self._publish_status()

    def _take_part(self, a: RoundAnnouncement, model) -> None:
        if time.time() > a.deadline:
            self._count("rounds_skipped")
            log.info("%s: round %d: its deadline passed before training could start; skipping",
                     self.client_id, a.round_id)
            return
        with self._train_lock:
            result = self._trainer.train(model.weights, a.config)
        self.last_loss = result.loss
        num_params = model.manifest.num_params
        update = self._updates.update(a, result.delta, result.num_samples, secrets.randbits(64))
        payload = encode_update(update)
        if self._trust is not None:
            payload = self._trust.seal(payload, client_id=self.client_id, round_id=a.round_id)
        with self._lock:
            current = self._announcement
        # A newer announcement may have come while training: under buffered aggregation the
        # update still counts as long as its base version is recent enough.
        over = "" if current is None else why_expired(current, a.round_id, a.model_version)
        if over:
            self._count("rounds_skipped")
            log.info("%s: round %d: the update is not sent: %s", self.client_id, a.round_id, over)
            return
        self._outbox.put(a.round_id, update.update_id, payload, base_version=a.model_version)
        self._last_round = a.round_id
        replace_file(self.state_dir / "state.json",
                          json.dumps({"last_round": a.round_id}).encode())
        self._send(a.round_id, update.update_id, payload)
        if self._budget_spent(a):  # another round like this one would not fit: say so now
            self._publish_status()
        log.info("%s: round %d: sent update %d (%d bytes, %d of %d values, loss %.4f)",
                 self.client_id, a.round_id, update.update_id, len(payload), update.k,
                 num_params, result.loss)

    def _send(self, round_id: int, update_id: int, payload: bytes, *,
              delay: float | None = None) -> None:
        try:
            self._conn.publish(self.topics.update(self.client_id), payload, qos=1)
        except ValueError as exc:  # paho refuses the message itself (e.g. too large)
            log.error("%s: could not publish update %d of round %d: %s", self.client_id,
                      update_id, round_id, exc)
            return
        delay = self.receipt_timeout if delay is None else delay
        self._handed[(round_id, update_id)] = (time.monotonic() + delay, delay)
        self._count("updates_sent")
        self._count("bytes_up", len(payload))
