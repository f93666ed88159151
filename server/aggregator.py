"""The aggregation server: rounds over MQTT, durable ingestion, strategies, model publication.

Threads and ownership:

* paho's network thread only queues update messages (the connection's ``intake``); the MQTT
  dispatcher thread (:class:`edgefl.transport.mqtt.MqttConnection`) runs
  :meth:`AggregationServer._on_message` for the rest: it tracks device status;
* the ingestion thread takes every queued update (up to :data:`MAX_BATCH`), decodes and validates
  each, stores the accepted ones in one transaction (group commit: one fsync per batch, not per
  update), and only then acknowledges them (PUBACK) and publishes their receipts
  (:func:`edgefl_server.ingest.answer_batch`);
* the round thread runs the state machine of :mod:`edgefl_server.rounds`: wait for devices, open
  a round, wait for answers or the deadline, aggregate, commit, publish;
* one lock guards the round state and the round's accepted updates, so an update is either in the
  round being aggregated or rejected as late, never both;
* with ``ingest_workers`` > 1, worker processes take the updates instead
  (:mod:`edgefl_server.workers`), and the store's transactions do what the lock does.

A round aggregates its updates in client-id order, whatever order they arrived in and whichever
process stored them: the model of a round is the same, bit for bit, with any number of workers.

Every state change is committed to the store (:mod:`edgefl_server.store`) before it is published,
so a server killed at any point restarts into the same round with the same accepted updates. The
retained model and announcement are published again on every (re)connection to the broker (a
broker that restarted without persistence forgot them), and the announcement at least every
``announce_refresh`` seconds (so devices can tell a live server from a frozen one).

Trust (``docs/security.md``): with a provisioned fleet directory (``edgefl fleet init``) the
server logs in with its own principals over TLS, signs everything it publishes with the fleet's
Ed25519 key (:class:`edgefl.trust.Signer`) and opens updates sealed to its X25519 key; it bounds
each device's influence (:mod:`edgefl_server.influence`). ``insecure=True`` runs without any of
it, with a warning. A key rotation made with ``edgefl fleet rotate-keys`` is promoted on start
or within :data:`~edgefl_server.provisioning.KEY_CHECK_INTERVAL` seconds while running
(:meth:`AggregationServer._check_keys`): the notice, signed with the current key, is published
retained on ``key`` before anything signed with the new key, and again first on every
reconnection; updates sealed to the replaced sealing key are opened until the rotation is
finished. Updates that devices sent while the server was
down wait in its persistent MQTT session (fixed client id, ``clean_start=False``); updates it had
received but not yet acknowledged are redelivered by the broker.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgefl.wire.model import Model
from edgefl.wire.protocol import (LOCAL_MECHANISMS, MECHANISMS, DeviceStatus, ProtocolError,
                                  TrainingConfig, Topics, check_name)
from edgefl.transport.mqtt import Message, MqttConnection, parse_broker_url
from edgefl.trust import Signer
from edgefl.wire import decode_update, encode_model

from .buffer import BufferConfig, scaled_by_staleness
from .downlink import DownlinkCompressor, DownlinkConfig
from .accounting import CentralPrivacy, ParametersChanged, PrivacyBudgetReached
from .influence import DEFAULT_MAX_SAMPLES, DEFAULT_MAX_UPDATE_NORM, InfluenceBounds
from .ingest import (ACCEPTED, DUPLICATE, MAX_BATCH, RECEIVE_MAXIMUM, UpdateIngestor,
                     answer_batch)
from .local_dp import swamp_warning
from .metrics import MetricsHttpServer, ServerMetrics
from .provisioning import KEY_CHECK_INTERVAL, MAX_INGEST_WORKERS, open_fleet, promote_rotation
from .rounds import (
    FINISHED, OPEN, WAITING, Decision, RoundResult, RoundState, decide, poisson_select,
    randomk_seed, select_clients,
)
from .store import ServerStore, StateError
from .strategies import DPFedAvg, make_strategy
from .workers import BatchReport, IngestWorkers

log = logging.getLogger(__name__)

#: How long a publish waits for the broker's PUBACK before the server logs a warning.
PUBLISH_TIMEOUT = 10.0
#: Seconds without a new device status before a round opens (the retained burst has arrived).
STATUS_SETTLE = 0.2


@dataclass
class ServerConfig:
    """Everything an :class:`AggregationServer` needs; ``edgefl server`` fills it from its options.

    Parameters
    ----------
    broker_url : str
        ``mqtt://host:port`` or ``mqtts://host:port``.
    fleet : str
        Fleet name (the topic prefix ``edgefl/<fleet>``).
    state_dir : path
        Where the server keeps its durable state; reuse it to resume after a crash.
    strategy, strategy_options
        Registry name (:data:`edgefl_server.strategies.STRATEGIES`) and its keyword options.
    rounds : int
        Number of rounds of the run; afterwards the announcement says "finished". A finished
        state directory started again with a larger number continues up to it.
    min_clients : int
        Devices that must be online before a round opens.
    clients_per_round : int, optional
        Devices selected per round (seeded); None selects every online device.
    round_timeout : float
        Seconds from opening a round to its deadline (and the length of the one extension).
    quorum : int, optional
        Accepted updates that let a round close at its deadline; None means ``min_clients``.
    training : TrainingConfig
        The local training config to announce (a strategy may adjust it, e.g. FedProx's mu). Its
        privacy config is the local mechanism devices apply (replace-one epsilon per round).
    central_privacy : CentralPrivacy, optional
        User-level central DP (DP-FedAvg): devices are selected by Poisson sampling at its rate
        (``clients_per_round`` must be None), clip their updates in L2, and the server adds the
        noise and accounts the run (:mod:`edgefl_server.accounting`); the strategy must be
        ``fedavg``. The run stops before a round that would exceed its target epsilon.
    metrics_port : int, optional
        Serve Prometheus metrics on this port (0 = a free one); None disables. The endpoint
        stays up after :meth:`AggregationServer.stop`, until :meth:`AggregationServer.close`
        or the end of the process.
    metrics_host : str
        The interface metrics are served on: loopback by default, ``0.0.0.0`` for all.
    max_update_bytes : int
        Update payloads above this are dropped unread.
    max_samples : int, optional
        Cap on the sample count (FedAvg weight) one update may claim; None removes it.
    max_update_norm : float, optional
        Updates with a larger L2 norm are clipped to it; None removes the bound.
    seed : int
        Seeds client selection and the rounds' random-k seeds.
    downlink : DownlinkConfig, optional
        Publish each new version also as a compressed refresh on ``edgefl/<fleet>/refresh``
        (:mod:`edgefl_server.downlink`); the global model is then the sum of the refreshes.
        None publishes full envelopes only.
    buffer : BufferConfig, optional
        Buffered asynchronous aggregation (FedBuff, :mod:`edgefl_server.buffer`) instead of
        synchronous rounds: every device may send at any time, updates on any of the last
        ``max_staleness + 1`` versions are accepted (scaled by staleness), and every
        ``buffer_size`` of them make a new version; ``rounds`` counts versions, and no round has
        a deadline, a selection or a quorum. None runs synchronous rounds.
    server_id : str, optional
        The server's fixed MQTT client id; ``edgefl-server-<fleet>`` by default.
    fleet_dir : path, optional
        A provisioned fleet directory (``edgefl fleet init``): the server's logins, the CA, its
        signing and sealing keys. Required unless ``insecure``.
    insecure : bool
        Plain MQTT without signatures or sealing (test brokers only); logs a warning.
    announce_refresh : float
        Longest time between two (signed) publications of the round announcement.
    username, password, tls, ca_certs
        Passed to the MQTT connection (taken from ``fleet_dir`` when it is given).
    ingest_workers : int
        1: this process ingests updates. N >= 2: N worker processes share them through an MQTT
        shared subscription and this process coordinates (:mod:`edgefl_server.workers`). On a
        provisioned fleet at most :data:`~edgefl_server.provisioning.MAX_INGEST_WORKERS` (the
        worker logins ``edgefl fleet`` makes).
    """

    broker_url: str
    fleet: str
    state_dir: str | Path
    strategy: str = "fedavg"
    strategy_options: dict = field(default_factory=dict)
    rounds: int = 10
    min_clients: int = 1
    clients_per_round: int | None = None
    round_timeout: float = 60.0
    quorum: int | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    central_privacy: CentralPrivacy | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_update_bytes: int = 16 << 20
    max_samples: int | None = DEFAULT_MAX_SAMPLES
    max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM
    seed: int = 0
    downlink: DownlinkConfig | None = None
    buffer: BufferConfig | None = None
    server_id: str | None = None
    fleet_dir: str | Path | None = None
    insecure: bool = False
    announce_refresh: float = 60.0
    username: str | None = None
    password: str | None = None
    tls: bool | None = None
    ca_certs: str | None = None
    ingest_workers: int = 1

    def __post_init__(self):
        check_name("fleet", self.fleet)
        if self.fleet_dir is None and not self.insecure:
            raise ValueError("the server needs its fleet directory (edgefl server --fleet-dir DIR, "
                             "made by `edgefl fleet init`) for its keys and logins, or "
                             "insecure=True (--insecure) for a plain test broker")
        InfluenceBounds(self.max_samples, self.max_update_norm)  # bad bounds fail now
        if not self.insecure and isinstance(self.ingest_workers, int) \
                and self.ingest_workers > MAX_INGEST_WORKERS:
            raise ValueError(f"a fleet directory provisions {MAX_INGEST_WORKERS} ingestion worker "
                             f"logins: use --ingest-workers {MAX_INGEST_WORKERS} or fewer, not "
                             f"{self.ingest_workers}")
        if self.server_id is None:
            self.server_id = f"edgefl-server-{self.fleet}"
        check_name("server id", self.server_id)
        for name, lo in (("rounds", 1), ("min_clients", 1), ("max_update_bytes", 64),
                         ("ingest_workers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        for name in ("clients_per_round", "quorum"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.buffer is not None and self.ingest_workers > 1:
            raise ValueError("buffered asynchronous aggregation runs with one ingesting process: "
                             "drop --ingest-workers or --buffer-size")
        if not (isinstance(self.round_timeout, (int, float)) and 0 < self.round_timeout < 1e7):
            raise ValueError(f"round_timeout must be a positive number of seconds, "
                             f"got {self.round_timeout!r}")
        mechanism = self.training.privacy.mechanism
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown privacy mechanism {mechanism!r}: use one of "
                             f"{', '.join(MECHANISMS)}")
        if self.central_privacy is not None:
            if self.strategy != "fedavg":
                raise ValueError(f"central DP aggregates with DP-FedAvg; strategy "
                                 f"{self.strategy!r} cannot be combined with it (use fedavg)")
            if self.clients_per_round is not None:
                raise ValueError("central DP selects devices by Poisson sampling at its "
                                 "sampling rate: leave clients_per_round unset")
            if self.buffer is not None:
                raise ValueError("central DP's accountant counts Poisson-sampled synchronous "
                                 "rounds: it cannot be combined with buffered asynchronous "
                                 "aggregation (--buffer-size)")
            if mechanism != "none":
                raise ValueError(f"central DP and the local mechanism {mechanism!r} cannot be "
                                 "combined: announce privacy 'none' with central DP")
            self.training = dataclasses.replace(self.training, privacy=dataclasses.replace(
                self.training.privacy, mechanism="central-gaussian",
                clip=self.central_privacy.clip, epsilon=0.0))
        elif mechanism == "central-gaussian":
            raise ValueError("the mechanism central-gaussian needs central_privacy (the server's "
                             "noise and accountant): use --privacy central")


class AggregationServer:
    """Runs federated rounds for one fleet over an MQTT broker.

    Parameters
    ----------
    config : ServerConfig
    initial_model : Model, optional
        The model of a new state directory (version 0 onwards). Required on first start; ignored
        when the state directory already holds a model (the saved one is resumed).
    model_given : bool
        True when the user chose ``initial_model`` explicitly: a state directory holding a model
        of another shape is then refused instead of silently resumed.
    evaluate : callable(Model) -> dict, optional
        Called after each round with the new global model; its numbers go into the round's
        :class:`~edgefl_server.rounds.RoundResult` ``metrics`` (e.g. held-out accuracy).
    on_round : callable(RoundResult), optional
        Called after each round (progress bars, tests).

    Use :meth:`run` to block until every round is done, or :meth:`start` / :meth:`wait` /
    :meth:`stop`; :meth:`close` (or leaving a ``with`` block) also ends the metrics endpoint.
    """

    def __init__(self, config: ServerConfig, *, initial_model: Model | None = None,
                 model_given: bool = False,
                 evaluate: Callable[[Model], dict] | None = None,
                 on_round: Callable[[RoundResult], None] | None = None):
        self.config = config
        self.topics = Topics(config.fleet)
        central = config.central_privacy
        self._accountant = None if central is None else central.accountant(config.rounds)
        if central is None:
            self.strategy = make_strategy(config.strategy, config.strategy_options)
        else:
            extra = sorted(set(config.strategy_options) - {"noise_seed"})
            if extra:
                raise ValueError(f"central DP's DP-FedAvg takes no option {', '.join(extra)} "
                                 "(its clip, noise and server learning rate come from the "
                                 "central privacy settings)")
            self.strategy = DPFedAvg(clip=central.clip,
                                     noise_multiplier=self._accountant.noise_multiplier,
                                     server_lr=central.server_lr, **config.strategy_options)
        # Central DP's selection must be unpredictable (the accountant's amplification by
        # sampling assumes so): never the user's seed.
        self._sampling_rng = np.random.default_rng(secrets.randbits(128))
        warning = self.strategy.compression_warning(config.training.compression)
        if warning:
            log.warning("%s", warning)
        self.metrics = ServerMetrics()
        self._initial_model = initial_model
        self._model_given = model_given
        self._evaluate = evaluate
        self._on_round = on_round
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._ingest_thread: threading.Thread | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._conn: MqttConnection | None = None  # updates and status in, receipts out
        self._control: MqttConnection | None = None  # models and round announcements out
        self._metrics_http: MetricsHttpServer | None = None
        self._store: ServerStore | None = None
        self._online: set[str] = set()
        self._privacy_left: dict[str, float] = {}  # epsilon left, as online devices report it
        self._status: dict[str, DeviceStatus] = {}  # the latest online status of each device
        self._declined: set[str] = set()  # selected devices that declined the open round
        self._participations: Counter[str] = Counter()  # accepted updates per device
        self._device_spent: dict[str, tuple[float, float]] = {}  # local DP, basic composition
        self._waiting_logged = ""
        self._workers: IngestWorkers | None = None
        self._updates: list = []  # decoded accepted updates of the open round (one process)
        self._round_rejected: Counter[str] = Counter()
        self._round_uplink = 0
        self._last_arrival = time.time()  # when the newest accepted update reached the server
        self._round_downlink = 0
        self._model_payload = b""
        self._signer: Signer | None = None
        self._fleet = None  # the provisioned fleet directory (None when insecure)
        self._key_lock = threading.Lock()  # a key notice goes out before the new key signs
        self._key_state: tuple | None = None  # the fleet's key files, as last acted on
        self._keys_checked_at = 0.0  # time.monotonic() of the last look for a rotation
        self._announced_at = 0.0  # time.monotonic() of the last announcement published
        self._status_seen_at = 0.0  # time.monotonic() of the last device status handled
        self.history: list[RoundResult] = []
        self.model: Model | None = None
        self._round: RoundState | None = None
        self.metrics.backlog = self._inbox.qsize
        self.metrics.connected = lambda: self.connected
        self.metrics.privacy_left = self._privacy_budgets

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def round(self) -> RoundState | None:
        """The current round state."""
        return self._round

    @property
    def connected(self) -> bool:
        """Whether both MQTT connections are up right now (they reconnect on their own)."""
        return all(c is not None and c.connected.is_set() for c in (self._conn, self._control))

    @property
    def workers(self) -> IngestWorkers | None:
        """The ingestion worker processes, with ``ingest_workers`` > 1."""
        return self._workers

    @property
    def metrics_port(self) -> int | None:
        """The port metrics are served on (useful with ``metrics_port=0``)."""
        return None if self._metrics_http is None else self._metrics_http.port

    def start(self, timeout: float = 30.0,
              cancel: threading.Event | None = None) -> "AggregationServer":
        """Load or create the state, connect to the broker, publish, start the round thread.

        Waiting for the broker ends early (BrokerUnreachable) once ``cancel`` is set.
        """
        cfg = self.config
        # Checked before the store exists: a start that fails on its URL must not have fixed
        # the model of a new state directory.
        parse_broker_url(cfg.broker_url)
        sealing_key = None
        login = dict(username=cfg.username, password=cfg.password, tls=cfg.tls,
                     ca_certs=cfg.ca_certs)
        control_login = dict(login)
        if cfg.insecure:
            log.warning("INSECURE: fleet %s runs without signatures or sealed updates; anyone who "
                        "can publish on the broker can steer its devices", cfg.fleet)
        else:
            fleet = open_fleet(cfg.fleet_dir)
            if fleet.fleet != cfg.fleet:
                raise ValueError(f"{cfg.fleet_dir} is provisioned for fleet {fleet.fleet!r}, not "
                                 f"{cfg.fleet!r}")
            creds = fleet.server_credentials()
            login = dict(username=creds["username"], password=creds["password"], tls=True,
                         ca_certs=str(fleet.ca_cert))
            control_login = dict(login, username=creds["control_username"])
            Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
            self._fleet = fleet
            self._signer = self._new_signer()
            self._promote_rotation()  # not connected yet: the connect hook publishes the notice
            self._key_state = fleet.key_state()
            sealing_key = fleet.sealing_keys()
        self._store = ServerStore(cfg.state_dir, fleet=cfg.fleet, strategy=cfg.strategy)
        saved = self._store.load()
        if saved is not None and self._model_given and self._initial_model is not None \
                and saved.model.manifest != self._initial_model.manifest:
            self._store.close()
            self._store = None
            raise StateError(f"state directory {cfg.state_dir} already holds a different model: "
                             "use another --state-dir for the new model, or drop --model to "
                             "resume the saved one")
        if saved is None:
            if self._initial_model is None:
                raise ValueError(f"state directory {cfg.state_dir} is new: pass an initial model "
                                 "(edgefl server --model mlp:64-32-10 or a model file)")
            self.model = self._initial_model
            self._round = RoundState(1, self.model.version)
            self._store.initialize(self.model, self._round)
        else:
            self.model, self._round = saved.model, saved.round
            if cfg.buffer is not None and self._round.open_to_all:
                # Announce the bound ingestion applies from now on: --max-staleness may have
                # changed since the round was stored.
                self._round = dataclasses.replace(self._round,
                                                  max_staleness=cfg.buffer.max_staleness)
            self.strategy.load_state_dict(saved.strategy_state)
            residual = saved.downlink_state.get("residual")
            self.history = [RoundResult.from_dict(r) for r in saved.history]
            try:
                self._resume_privacy_mode()
            except StateError:
                self._store.close()
                self._store = None
                raise
            # Asynchronous aggregation buffers updates of several rounds: all not yet counted.
            stored_updates = [] if cfg.ingest_workers > 1 else \
                self._store.pending_updates() if cfg.buffer is not None else \
                self._store.round_updates(self._round.round_id)
            for stored in stored_updates:
                # Accepted under the same size bound, whatever the default of decode_update.
                self._updates.append(decode_update(
                    stored.payload, expected_params=self.model.manifest.num_params,
                    max_bytes=max(cfg.max_update_bytes, len(stored.payload))))
            if self._round.phase == FINISHED and cfg.rounds > self._round.round_id:
                # a finished run started again with a larger --rounds continues where it ended
                self._round = RoundState(self._round.round_id + 1, self.model.version)
                self._store.save_round(self._round)
            log.info("resuming fleet %s at round %d (%s) with model version %d and %d accepted "
                     "update(s)", cfg.fleet, self._round.round_id, self._round.phase,
                     self.model.version, len(self._updates))
        self._replay_privacy()
        self._warn_if_local_dp_cannot_learn()
        bounds = InfluenceBounds(cfg.max_samples, cfg.max_update_norm)
        # Updates stored before a restart are bounded again, exactly as when they arrived.
        self._updates = [bounds.apply(u)[0] for u in self._updates]
        self._ingestor = UpdateIngestor(self._store, self.topics,
                                        num_params=self.model.manifest.num_params,
                                        max_update_bytes=cfg.max_update_bytes, bounds=bounds,
                                        sealing_key=sealing_key, buffer=cfg.buffer)
        self._model_payload = encode_model(self.model)
        self._downlink = None if cfg.downlink is None else DownlinkCompressor(
            cfg.downlink, self.model.manifest.num_params,
            residual=residual if saved is not None else None)
        self.metrics.set_position(round_id=self._round.round_id, model_version=self.model.version)
        if self._round.phase == OPEN:
            self.metrics.round_opened(round_id=self._round.round_id,
                                      selected=len(self._round.selected),
                                      opened_at=self._round.opened_at, deadline=self._round.deadline)
        if cfg.metrics_port is not None and self._metrics_http is None:
            self._metrics_http = MetricsHttpServer(self.metrics, cfg.metrics_port,
                                                   cfg.metrics_host).start()
        # With workers, updates come through their shared subscription; an update subscription
        # left in this session by an earlier single-process run still delivers here, and those
        # are judged like a worker's.
        subscriptions = [(self.topics.all_status, 1)] if cfg.ingest_workers > 1 else \
            [(self.topics.all_updates, 1), (self.topics.all_status, 1)]
        self._conn = MqttConnection(
            cfg.server_id, cfg.broker_url, **login, manual_ack=True, receive_maximum=RECEIVE_MAXIMUM, subscriptions=subscriptions,
            on_message=self._on_message, intake=self._take_update,
        )
        # A second connection for models and announcements: the client library sends a
        # connection's QoS 1 messages through one bounded in-flight window, and a burst of
        # receipts in it would delay the new model by tens of milliseconds.
        self._control = MqttConnection(f"{cfg.server_id}.control", cfg.broker_url, **control_login)
        # Retained messages survive in the broker, but a restarted or replaced broker may have
        # lost them: on every (re)connection the current state goes out again (idempotent for
        # devices), not only at start.
        self._control.on_connect_hooks.append(self._republish)
        try:
            if cfg.ingest_workers > 1:
                self._workers = IngestWorkers(cfg, cfg.ingest_workers,
                                              self.model.manifest.num_params, self._on_report,
                                              self.metrics.count_worker_restart)
                self._workers.start(timeout=timeout)
            self._control.start(timeout=timeout, cancel=cancel)
            self._conn.start(timeout=timeout, cancel=cancel)
        except BaseException:
            self._shutdown_io()
            raise
        if self._round.phase == FINISHED:
            self._finished.set()
        self._thread = threading.Thread(target=self._loop, name="edgefl-rounds", daemon=True)
        self._thread.start()
        self._ingest_thread = threading.Thread(target=self._ingest_loop, name="edgefl-ingest",
                                               daemon=True)
        self._ingest_thread.start()
        return self

    def _privacy_mode(self) -> str:
        """This start's privacy mode, as each round records it (``none`` for no privacy)."""
        if self._accountant is not None:
            return "central"
        return "local" if self.config.training.privacy.mechanism in LOCAL_MECHANISMS else "none"

    def _resume_privacy_mode(self) -> None:
        """Refuse to resume a run under another privacy mode or other central DP parameters
        than its recorded rounds used: its guarantee is over the whole run, so every round must
        be accounted by the mechanism it really ran (before the state changes)."""
        cfg = self.config
        mode = self._privacy_mode()
        modes = Counter(r.privacy.get("mode", "none") for r in self.history)
        other = {m: n for m, n in modes.items() if m != mode}
        if other:
            ran = ", ".join(f"{n} with privacy {m!r}" for m, n in sorted(other.items()))
            raise StateError(
                f"state directory {cfg.state_dir}: the run's earlier rounds ran {ran}, this start "
                f"has privacy {mode!r}; a run's privacy mode cannot change on resume (its "
                f"guarantee covers the whole run). Resume it with the privacy options it was "
                f"started with, or start the new mode in a new --state-dir")
        if mode == "central":
            recorded = [(r.privacy["noise_multiplier"], r.privacy["sampling_rate"])
                        for r in self.history]
            try:
                self._accountant.resume(recorded)
            except ParametersChanged as exc:
                z, q = recorded[0]
                raise StateError(
                    f"state directory {cfg.state_dir}: {exc}. A central-DP run keeps its noise "
                    f"multiplier and sampling rate (a target epsilon calibrates the noise "
                    f"multiplier for --rounds, so another --rounds changes it): resume with "
                    f"--sampling-rate {q!r} --noise-multiplier {z!r} (with --target-epsilon the "
                    f"run still stops before a round that would exceed it), or start a new run "
                    f"in a new --state-dir") from None

    def _replay_privacy(self) -> None:
        """Rebuild who took part and what the run spent from the history (after a restart)."""
        for result in self.history:
            answered = [c for c in result.selected if c not in result.stragglers]
            self._participations.update(answered)
            cost = result.privacy.get("update_cost")
            if cost:
                for c in answered:
                    e, d = self._device_spent.get(c, (0.0, 0.0))
                    self._device_spent[c] = (e + cost[0], d + cost[1])
        report = self.privacy_report()
        if report:
            self.metrics.set_privacy(report["epsilon"], report["delta"])
            log.info("privacy: %s", report["summary"])

    def _warn_if_local_dp_cannot_learn(self) -> None:
        cfg = self.config
        devices = cfg.clients_per_round or cfg.min_clients
        warning = swamp_warning(cfg.training.privacy, self.model.manifest.num_params, devices,
                                cfg.rounds)
        if warning:
            log.warning("%s", warning)

    def privacy_report(self) -> dict:
        """What the run's privacy is now ({} without privacy); also each round's ``privacy``.

        Central DP: ``epsilon`` at ``delta`` for one device's whole data (add/remove adjacency,
        RDP accountant over the Poisson-sampled rounds), and ``epsilon_if_selection_known``, the
        guarantee against a reader of the round topic, which names who was selected. Local DP:
        the most replace-one ``epsilon`` and ``delta`` any device spent (basic composition over
        the updates the server accepted).
        """
        privacy = self.config.training.privacy
        if self._accountant is not None:
            a = self._accountant
            epsilon = a.epsilon()
            most = max(self._participations.values(), default=0)
            known = a.epsilon_if_selection_known(most)
            return {
                "mode": "central", "mechanism": "central-gaussian", "epsilon": epsilon,
                "delta": a.delta, "rounds": a.rounds, "target_epsilon": a.target_epsilon,
                "noise_multiplier": a.noise_multiplier, "sampling_rate": a.sampling_rate,
                "clip": privacy.clip, "adjacency": "add/remove one device (user-level)",
                "accountant": "RDP (dp-accounting), Poisson-sampled Gaussian",
                "epsilon_if_selection_known": known, "most_participations": most,
                "summary": (f"epsilon {epsilon:.4g} at delta {a.delta:g} after {a.rounds} "
                            f"round(s) (user-level, add/remove one device; RDP, Poisson rate "
                            f"{a.sampling_rate:g}, noise multiplier {a.noise_multiplier:.4g}"
                            + (f", target {a.target_epsilon:g}" if a.target_epsilon else "")
                            + f"); against a reader of the round topic, who sees who was "
                            f"selected: epsilon {known:.4g} ({most} participation(s))"),
            }
        if privacy.mechanism in LOCAL_MECHANISMS:
            epsilon, delta = max(self._device_spent.values(), default=(0.0, 0.0))
            cost = (privacy.epsilon, privacy.delta if privacy.mechanism == "gaussian" else 0.0)
            return {
                "mode": "local", "mechanism": privacy.mechanism, "epsilon": epsilon,
                "delta": delta, "update_cost": cost, "clip": privacy.clip,
                "adjacency": "replace-one (a device's data, per update)",
                "composition": "basic (sums over the updates a device sent)",
                "summary": (f"the most any device spent: epsilon {epsilon:.4g}, delta "
                            f"{delta:.3g} (replace-one, basic composition; {privacy.mechanism} "
                            f"at epsilon {cost[0]:g} per update)"),
            }
        return {}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every round is done; True if so, False on timeout."""
        return self._finished.wait(timeout)

    def run(self) -> list[RoundResult]:
        """Start (if needed), block until every round is done, stop; return the history."""
        if self._thread is None:
            self.start()
        try:
            while not self._finished.wait(0.5):
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the round thread stopped before the last round; see the log")
        finally:
            self.stop()
        return self.history

    def stop(self) -> None:
        """Stop the round thread and disconnect; the state directory keeps everything.

        The metrics endpoint stays up (its last values readable) until :meth:`close`.
        """
        self._stopping.set()
        self._wake.set()
        self._inbox.put(None)
        for thread in (self._thread, self._ingest_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=30)
        self._thread = self._ingest_thread = None
        self._shutdown_io()

    def close(self) -> None:
        """:meth:`stop`, and end the metrics endpoint."""
        self.stop()
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None

    def _shutdown_io(self) -> None:
        if self._workers is not None:
            self._workers.stop()
            self._workers = None
        for conn in (self._conn, self._control):
            if conn is not None:
                conn.stop()
        self._conn = self._control = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "AggregationServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _republish(self, session_present: bool = False) -> None:
        """Publish the retained key notice, model and announcement again (connect hook,
        refresh, key rotation)."""
        with self._key_lock:
            # The notice first: a device that pins the replaced key learns the new one before
            # the model and announcement signed with it arrive.
            notice = None if self._fleet is None else self._fleet.key_notice()
            if notice is not None and self._control is not None:
                self._control.publish(self.topics.key, notice, qos=1, retain=True)
            with self._lock:
                model_payload, announcement = self._model_payload, self._round.announcement()
            self._publish(self.topics.model, model_payload, "model", retain=True, wait=False)
            self._publish(self.topics.round, announcement.to_json(), "round", retain=True,
                          wait=False)

    # -- key rotation ----------------------------------------------------------------------------

    def _new_signer(self) -> Signer:
        """A signer with the fleet's current signing key; the sequence file is shared by every
        key, so sequences keep growing across a rotation (devices keep theirs)."""
        return Signer(self._fleet.signing_key(), self.config.fleet,
                      sequence_file=Path(self.config.state_dir) / "signing-sequence.json")

    def _promote_rotation(self) -> bool:
        """Promote a pending key rotation of the fleet directory; True if there was one.

        The notice is signed with the current key and published before the signer changes: on
        the one control connection the broker keeps that order, so a device reads the notice
        before the first message signed with the new key.
        """
        promoted = promote_rotation(self._fleet.directory,
                                    lambda payload: self._signer.sign("key", payload))
        if promoted is None:
            return False
        rotation, notice = promoted
        with self._key_lock:
            if self._control is not None:
                self._control.publish(self.topics.key, notice, qos=1, retain=True)
            self._signer = self._new_signer()
        log.warning("key rotation: signing key %s replaces %s, sealing key %s replaces %s (still "
                    "opened until `edgefl fleet rotate-keys --finish`); the notice is retained "
                    "on %s", rotation.signing_to, rotation.signing_from, rotation.sealing_to,
                    rotation.sealing_from, self.topics.key)
        return True

    def _check_keys(self) -> None:
        """Act on a change of the fleet's key files: promote a pending rotation, and open
        updates sealed to exactly the keys the directory holds (a finished rotation's replaced
        key no longer). Errors are logged and tried again at the next change."""
        self._keys_checked_at = time.monotonic()
        state = self._fleet.key_state()
        if state == self._key_state:
            return
        self._key_state = state
        try:
            if self._promote_rotation():
                self._republish()  # the retained model and announcement, signed with the new key
            self._ingestor.set_sealing_keys(self._fleet.sealing_keys())
            self._key_state = self._fleet.key_state()
        except Exception:  # noqa: BLE001 - e.g. a key file of the wrong mode: keep the rounds
            log.exception("acting on the changed key files of %s failed; the server keeps its "
                          "keys until they change again", self._fleet.directory)

    # -- messages (dispatcher thread) ------------------------------------------------------------

    def _take_update(self, msg: Message) -> bool:
        """paho's network thread: queue an update for the ingestion thread, nothing more."""
        if msg.topic.endswith("/update"):
            self._inbox.put((msg, time.time()))  # acknowledged by the ingestion thread once stored
            return True
        return False

    def _on_message(self, msg: Message) -> None:
        # Every QoS 1 message must be acknowledged once handled, status messages too, whatever
        # happens while handling it: the broker stops delivering to a client whose in-flight
        # window (e.g. Mosquitto's 20) is full of unacknowledged messages.
        try:
            if msg.topic.endswith("/status"):
                self._on_status(msg)
            else:
                log.warning("ignoring a message on unexpected topic %s", msg.topic)
        finally:
            self._conn.ack(msg)

    def _on_status(self, msg: Message) -> None:
        client = self.topics.client_of(msg.topic)
        if client is None:
            return
        try:
            status = DeviceStatus.from_json(msg.payload) if msg.payload else DeviceStatus("offline")
        except ProtocolError as exc:
            log.warning("ignoring the status of %s: %s", client, exc)
            return
        online = status.state == "online"
        left = status.capabilities.get("privacy_remaining") if online else None
        # A device that says it has no samples (none fits the model) could only let a round
        # wait for it until the deadline: it is not selected until it says it has some.
        if online and status.capabilities.get("samples", 1) == 0:
            log.info("device %s is online without samples to train on; not selecting it", client)
            online = False
        with self._lock:
            (self._online.add if online else self._online.discard)(client)
            if isinstance(left, (int, float)) and not isinstance(left, bool):
                self._privacy_left[client] = float(left)
            else:
                self._privacy_left.pop(client, None)
            if online:
                self._status[client] = status
            else:
                self._status.pop(client, None)
            self.metrics.set_online(len(self._online))
            r = self._round
            if r is not None and r.phase == OPEN and client in r.selected_set \
                    and status.declined_round == r.round_id:
                self._declined.add(client)
                log.warning("round %d: %s declined: %s", r.round_id, client,
                            status.capabilities["declined"]["reason"])
        self._status_seen_at = time.monotonic()
        self._wake.set()

    def _ingest_loop(self) -> None:
        while True:
            batch = [self._inbox.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            batch = [item for item in batch if item is not None]
            delay = 0.5
            while batch and not self._stopping.is_set():
                try:
                    self._ingest(batch)
                    break
                except Exception:  # noqa: BLE001 - e.g. a full disk: keep serving, retry
                    # Unacknowledged until stored: the broker keeps them (and redelivers them to
                    # a restarted server); retrying here keeps its in-flight window from filling.
                    log.exception("storing %d update(s) failed; retrying in %.1f s", len(batch),
                                  delay)
                    self._stopping.wait(delay)
                    delay = min(2 * delay, 30.0)
            if stopping:
                return

    def _privacy_budgets(self) -> list[float]:
        with self._lock:
            return [self._privacy_left[c] for c in self._online if c in self._privacy_left]

    def _answered(self) -> int:
        """Selected devices that answered the open round: an accepted update, or declined."""
        if self._workers is not None:
            return self._store.count_updates(self._round.round_id) + len(self._declined)
        return len(self._updates) + len(self._declined)

    def _on_report(self, report: BatchReport) -> None:
        """A worker stored and answered a batch (runs on the workers' report thread)."""
        self.metrics.count_updates(report.accepted, report.rejected, report.uplink_bytes)
        self.metrics.count_published(report.downlink_bytes)
        with self._lock:
            if report.round_id == self._round.round_id:
                self._round_uplink += report.uplink_bytes
                self._round_downlink += report.downlink_bytes
                if report.accepted:
                    self._last_arrival = max(self._last_arrival, report.last_arrival)
        self._wake.set()

    def _ingest(self, batch: list[tuple[Message, float]]) -> None:
        arrivals = [t for _, t in batch]
        batch = [m for m, _ in batch]
        payloads = [bytes(m.payload) for m in batch]
        messages = [(m.topic, p) for m, p in zip(batch, payloads)]
        with self._lock:
            if self._workers is not None:  # judged like a worker's batch, against the store
                outcomes, _ = self._ingestor.ingest_batch_shared(messages, now=time.time())
            else:
                outcomes = self._ingestor.ingest_batch(messages, self._round, now=time.time())
            for outcome, payload, arrival in zip(outcomes, payloads, arrivals):
                self._round_uplink += len(payload)
                if outcome.status == ACCEPTED:
                    if self._workers is None:
                        self._updates.append(outcome.update)
                    self._last_arrival = arrival
                elif outcome.status != DUPLICATE and self._workers is None:
                    self._round_rejected[outcome.code] += 1  # with workers: in the store
            if self.config.buffer is not None:
                answered = self._answered() >= self.config.buffer.buffer_size
            else:
                answered = self._answered() >= len(self._round.selected) > 0
            finishing = answered and self._round.round_id >= self.config.rounds
        # Stored (or judged) first, acknowledged second: an acknowledged update is on disk.
        # When this batch completes the last round, its receipts must reach the broker before
        # "finished" is announced: a device may stop listening then. (Between rounds devices
        # stay connected, and waiting would delay the next model by the receipts' round trip.)
        sent = answer_batch(self._conn, self.topics, batch, outcomes, [len(p) for p in payloads],
                            metrics=self.metrics, confirm=finishing,
                            publish_timeout=PUBLISH_TIMEOUT, signer=self._signer)
        with self._lock:
            self._round_downlink += sent
        if answered:
            self._wake.set()

    def _publish(self, topic: str, payload: bytes, kind: str, *, retain: bool = False,
                 wait: bool = True, via: MqttConnection | None = None) -> None:
        """Sign ``payload`` as a ``kind`` message and publish it at QoS 1, on the control
        connection unless ``via`` says otherwise."""
        conn = via or self._control
        if conn is None:
            return  # stopping
        if kind == "round":
            self._announced_at = time.monotonic()
        if self._signer is not None:
            subject = self.topics.client_of(topic) if kind == "receipt" else ""
            payload = self._signer.sign(kind, payload, subject=subject or "")
        ok = conn.publish(topic, payload, qos=1, retain=retain,
                          timeout=PUBLISH_TIMEOUT if wait else None)
        with self._lock:
            self._round_downlink += len(payload)
        self.metrics.count_published(len(payload))
        if not ok:
            log.warning("publish to %s not confirmed by the broker; paho resends it after "
                        "reconnecting", topic)

    # -- rounds (round thread) -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                if self._fleet is not None \
                        and time.monotonic() - self._keys_checked_at > KEY_CHECK_INTERVAL:
                    self._check_keys()
                if time.monotonic() - self._announced_at > self.config.announce_refresh:
                    self._republish()  # re-signed: devices see the server is alive
                with self._lock:
                    r = self._round
                if r.phase == FINISHED:
                    self._finished.set()
                    return
                if r.phase == WAITING:
                    if not self._try_open(r):
                        # Statuses settle sooner than the next half-second poll: open then.
                        settling = STATUS_SETTLE - (time.monotonic() - self._status_seen_at)
                        self._wake.wait(min(0.5, settling) if settling > 0 else 0.5)
                    continue
                with self._lock:
                    answered = self._answered()
                if self.config.buffer is not None:
                    if answered >= self.config.buffer.buffer_size:
                        self._close(Decision.CLOSE_BUFFER)
                    else:
                        self._wake.wait(0.5)
                    continue
                quorum = self.config.quorum or self.config.min_clients
                decision = decide(r, answered, now=time.time(), quorum=quorum)
                if decision is Decision.WAIT:
                    self._wake.wait(max(0.0, min(r.deadline - time.time(), 0.5)))
                elif decision is Decision.EXTEND:
                    self._extend(r)
                else:
                    self._close(decision)
        except Exception:  # noqa: BLE001 - logged; run() notices the dead thread and raises
            log.exception("the round loop failed; the state directory is consistent, restart "
                          "the server to resume")

    def _eligible(self, online: list[str]) -> list[str]:
        """The online devices that can take part: available, and accepting the mechanism."""
        mechanism = self.config.training.privacy.mechanism
        out = []
        for client in online:
            status = self._status.get(client)
            if status is None or (status.available and mechanism in status.mechanisms):
                out.append(client)
        return out

    def _try_open(self, r: RoundState) -> bool:
        cfg = self.config
        if time.monotonic() - self._status_seen_at < STATUS_SETTLE:
            # Retained statuses arrive as a burst after a (re)connect (more slowly over TLS):
            # select from all of them, not from the first one handled.
            return False
        if self._accountant is not None:
            try:
                self._accountant.check_round()
            except PrivacyBudgetReached as exc:
                self._finish_early(r, str(exc))
                return True
        with self._lock:
            online = sorted(self._online)
            eligible = self._eligible(online)
        if len(eligible) < cfg.min_clients:
            why = (f"waiting: {len(eligible)} of {len(online)} online device(s) can take part "
                   f"(the others say they cannot: privacy budget spent, no samples, or they do "
                   f"not accept {cfg.training.privacy.mechanism!r}), {cfg.min_clients} needed")
            if len(online) >= cfg.min_clients and why != self._waiting_logged:
                log.warning("round %d: %s", r.round_id, why)
                self._waiting_logged = why
            return False
        now = time.time()
        if cfg.buffer is not None:
            opened = self._open_to_all(r, now)
            selected = ()
        else:
            if self._accountant is not None:
                rate = self._accountant.sampling_rate
                selected = poisson_select(eligible, rate, self._sampling_rng)
                expected = rate * len(eligible)
            else:
                selected = select_clients(eligible, cfg.clients_per_round, seed=cfg.seed,
                                          round_id=r.round_id)
                expected = float(len(selected))
            opened = dataclasses.replace(
                r, phase=OPEN, deadline=now + cfg.round_timeout, selected=selected,
                randomk_seed=randomk_seed(cfg.seed, r.round_id),
                config=self.strategy.configure_training(cfg.training), extended=False,
                opened_at=now, expected_clients=expected)
        self._store.save_round(opened)
        with self._lock:
            self._round = opened
            self._declined = set()
        self.metrics.round_opened(round_id=r.round_id, selected=len(selected), opened_at=now,
                                  deadline=opened.deadline)
        self._publish(self.topics.round, opened.announcement().to_json(), "round", retain=True)
        log.info("round %d open: model version %d, %d of %d online device(s) selected (%d "
                 "eligible), deadline in %gs", r.round_id, opened.model_version, len(selected),
                 len(online), len(eligible), cfg.round_timeout)
        return True

    def _open_to_all(self, r: RoundState, now: float) -> RoundState:
        """``r`` open to every device, with no deadline (buffered asynchronous aggregation)."""
        cfg = self.config
        # The announcement's deadline is when devices stop training for it: far ahead, since a
        # buffered round ends when enough updates arrived, not at a time.
        return dataclasses.replace(
            r, phase=OPEN, deadline=now + 365 * 86400.0, selected=(), open_to_all=True,
            randomk_seed=randomk_seed(cfg.seed, r.round_id),
            config=self.strategy.configure_training(cfg.training), extended=False, opened_at=now,
            max_staleness=cfg.buffer.max_staleness)

    def _finish_early(self, r: RoundState, reason: str) -> None:
        """End the run before round ``r``: its privacy target does not allow another round."""
        finished = RoundState(r.round_id - 1, self.model.version, FINISHED)
        self._store.save_round(finished)
        with self._lock:
            self._round = finished
        self._publish(self.topics.round, finished.announcement().to_json(), "round", retain=True)
        log.warning("the run stops before round %d of %d: %s", r.round_id, self.config.rounds,
                    reason)

    def _extend(self, r: RoundState) -> None:
        extended = dataclasses.replace(r, deadline=time.time() + self.config.round_timeout,
                                       extended=True)
        self._store.save_round(extended)
        with self._lock:
            self._round = extended
        self.metrics.round_extended(extended.deadline)
        self._publish(self.topics.round, extended.announcement().to_json(), "round", retain=True)
        log.warning("round %d: no quorum at the deadline (%d of %d needed); extended once by %gs",
                    r.round_id, self._answered(), self.config.quorum or self.config.min_clients,
                    self.config.round_timeout)

    def _close(self, decision: Decision) -> None:
        t0 = time.perf_counter()
        with self._lock:
            r = self._round
            last_arrival = self._last_arrival
            if self._workers is None:
                updates = sorted(self._updates, key=lambda u: u.client_id)
                model, nxt, result, new_weights, refresh = self._aggregate(
                    r, updates, decision, dict(self._round_rejected))
                self._store.commit_round(
                    closed_round=r.round_id, model=model, next_round=nxt,
                    strategy_state=self.strategy.state_dict(), record=result.to_dict(),
                    downlink_state=self._downlink_state(),
                    counted=None if self.config.buffer is None
                    else [(u.round_id, u.client_id) for u in updates])
            else:
                # The workers' updates, frozen: none can be added until the commit below.
                with self._store.closing_round(r.round_id) as closing:
                    updates = [decode_update(u.payload, expected_params=self.model.manifest.num_params,
                                             max_bytes=max(self.config.max_update_bytes,
                                                           len(u.payload)))
                               for u in closing.updates]  # in client-id order
                    model, nxt, result, new_weights, refresh = self._aggregate(
                        r, updates, decision, closing.rejected)
                    closing.commit(model=model, next_round=nxt,
                                   strategy_state=self.strategy.state_dict(),
                                   record=result.to_dict(),
                                   downlink_state=self._downlink_state())
            self.model, self._round = model, nxt
            self._updates = []
            self._declined = set()
            self._round_rejected = Counter()
            self._round_uplink = 0
            downlink_before, self._round_downlink = self._round_downlink, 0
        if new_weights is not None:
            self._model_payload = encode_model(model)
            # Not waiting here: the broker handles one connection's messages in order, so the
            # announcement's PUBACK below also confirms the model, one round trip instead of two.
            self._publish(self.topics.model, self._model_payload, "model", retain=True, wait=False)
        if refresh is not None:
            # Before the announcement: a device that sees an announcement of a version it does
            # not hold after this has missed the refresh and takes the full envelope.
            self._publish(self.topics.refresh, refresh, "refresh", wait=False)
        self._publish(self.topics.round, nxt.announcement().to_json(), "round", retain=True)
        seconds = time.perf_counter() - t0
        since_last_update = time.time() - last_arrival
        with self._lock:
            downlink, self._round_downlink = downlink_before + self._round_downlink, 0
        result = dataclasses.replace(result, downlink_bytes=downlink, aggregation_seconds=seconds,
                                     last_update_to_model_seconds=since_last_update,
                                     metrics=self._evaluate_model(model))
        self._store.save_record(r.round_id, result.to_dict())
        self.metrics.count_round(seconds, nxt.round_id, model.version,
                                 duration=time.time() - r.opened_at if r.opened_at else None,
                                 stragglers=len(result.stragglers),
                                 quorum=decision is not Decision.CLOSE_NO_QUORUM)
        if result.metrics:
            self.metrics.set_evaluation(result.metrics)
        if result.privacy:
            self.metrics.set_privacy(result.privacy["epsilon"], result.privacy["delta"])
            log.info("round %d privacy: %s", r.round_id, result.privacy["summary"])
        self.history.append(result)
        shown = " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
        rejected = ", ".join(f"{code}={n}" for code, n in sorted(result.rejected.items()))
        log.info("round %d closed (%s): %d accepted, %d rejected%s, %d straggler(s); model "
                 "version %d%s in %.1f ms; %d B up, %d B down %s",
                 r.round_id, decision.value, result.accepted, sum(result.rejected.values()),
                 f" ({rejected})" if rejected else "", len(result.stragglers), model.version,
                 "" if new_weights is not None else " (kept: nothing usable arrived)",
                 seconds * 1e3, result.uplink_bytes, result.downlink_bytes, shown)
        if self._on_round is not None:
            try:
                self._on_round(result)
            except Exception:  # noqa: BLE001 - an observer's bug must not stop the rounds
                log.exception("on_round callback failed")

    def _aggregate(self, r: RoundState, updates: list, decision: Decision,
                   rejected: dict[str, int]):
        """The new model, next round and result of closing ``r`` with ``updates`` (client-id
        order: the same sums in the same order, however the updates arrived)."""
        model = self.model
        # FedBuff: an update on an older version moves the model less (1 / sqrt(1 + staleness)).
        weighted = updates if self.config.buffer is None else \
            scaled_by_staleness(updates, model.version)
        new_weights = self.strategy.aggregate_round(model.weights, weighted,
                                                    expected_clients=r.expected_clients)
        if new_weights is not None and not np.isfinite(new_weights).all():
            # Huge (but finite) updates can overflow the sum: keep the model rather than
            # publish one that no device could use (and crash on every restart).
            log.error("round %d: the aggregate of %d update(s) is not finite; keeping model "
                      "version %d (set --max-update-norm to bound updates)", r.round_id,
                      len(updates), model.version)
            new_weights = None
        refresh = None
        if new_weights is not None and self._downlink is not None:
            # The published model is what the refresh rebuilds on every device (STC).
            refresh, model = self._downlink.refresh(model, new_weights, round_id=r.round_id)
        elif new_weights is not None:
            model = model.with_weights(new_weights, version=model.version + 1,
                                       round_id=r.round_id)
        last = r.round_id >= self.config.rounds
        nxt = (RoundState(r.round_id, model.version, FINISHED) if last
               else RoundState(r.round_id + 1, model.version, WAITING))
        if self.config.buffer is not None and not last:
            nxt = self._open_to_all(nxt, time.time())  # no waiting between buffered versions
        answered = {u.client_id for u in updates}
        result = RoundResult(
            round_id=r.round_id, model_version=model.version, accepted=len(updates),
            rejected=rejected, uplink_bytes=self._round_uplink,
            downlink_bytes=0, aggregation_seconds=0.0, metrics={}, selected=r.selected,
            stragglers=tuple(c for c in r.selected if c not in answered),
            close_reason=decision.value, privacy=self._charge_privacy(answered))
        return model, nxt, result, new_weights, refresh

    def _downlink_state(self) -> dict | None:
        return None if self._downlink is None else {"residual": self._downlink.residual}

    def _charge_privacy(self, answered: set[str]) -> dict:
        """Account the round being closed (its accepted devices ``answered``); the run's privacy
        report after it (see :meth:`privacy_report`)."""
        self._participations.update(answered)
        report = self.privacy_report()
        if report.get("mode") == "central":
            self._accountant.charge_round()
        elif report.get("mode") == "local":
            cost = report["update_cost"]
            for c in answered:
                e, d = self._device_spent.get(c, (0.0, 0.0))
                self._device_spent[c] = (e + cost[0], d + cost[1])
        return self.privacy_report()

    def _evaluate_model(self, model: Model) -> dict:
        if self._evaluate is None:
            return {}
        try:
            return {k: float(v) for k, v in self._evaluate(model).items()}
        except Exception:  # noqa: BLE001 - evaluation is reporting, never a reason to stop
            log.exception("evaluating model version %d failed", model.version)
            return {}
