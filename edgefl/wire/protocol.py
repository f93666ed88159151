"""The MQTT protocol between devices and the aggregation server: topics and control messages.

Control messages (round announcements, receipts, device status) are small UTF-8 JSON objects that
carry no model numbers; updates and models travel in the binary wire format (:mod:`edgefl.wire`).
Everything the server publishes travels inside a signed message and every update inside a sealed
one (:mod:`edgefl.trust`), except in ``--insecure`` runs.
The full protocol is specified in ``docs/protocol.md``.

Topics, for a fleet ``F`` and a device ``D``::

    edgefl/F/model               retained  current global model (binary envelope)        server -> all
    edgefl/F/refresh             QoS 1     model refresh (binary delta, v -> v+1)         server -> all
    edgefl/F/round               retained  RoundAnnouncement (JSON)                       server -> all
    edgefl/F/key                 retained  key rotation notice                            server -> all
    edgefl/F/clients/D/update    QoS 1     update (binary)                                device -> server
    edgefl/F/clients/D/status    retained  DeviceStatus (JSON); Last Will "offline"       device -> all
    edgefl/F/clients/D/receipt   QoS 1     Receipt (JSON)                                 server -> device
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

#: Version of the JSON control messages; a receiver rejects any other.
PROTOCOL_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ProtocolError(ValueError):
    """A control message or a name that does not follow the protocol."""


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid fleet or client id, else raise :class:`ProtocolError`.

    Ids become MQTT topic levels, so they may not contain ``/``, ``+`` or ``#``.
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise ProtocolError(
            f"{kind} {value!r} is not valid: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet."""

    fleet: str

    def __post_init__(self):
        check_name("fleet", self.fleet)

    @property
    def prefix(self) -> str:
        return f"edgefl/{self.fleet}"

    @property
    def model(self) -> str:
        return f"{self.prefix}/model"

    @property
    def refresh(self) -> str:
        """Model refreshes (QoS 1, not retained): each new version as a delta."""
        return f"{self.prefix}/refresh"

    @property
    def round(self) -> str:
        return f"{self.prefix}/round"

    @property
    def key(self) -> str:
        """Retained key rotation notice (signed with the key it replaces)."""
        return f"{self.prefix}/key"

    def update(self, client_id: str) -> str:
        return f"{self.prefix}/clients/{check_name('client id', client_id)}/update"

    def status(self, client_id: str) -> str:
        return f"{self.prefix}/clients/{check_name('client id', client_id)}/status"

    def receipt(self, client_id: str) -> str:
        return f"{self.prefix}/clients/{check_name('client id', client_id)}/receipt"

    @property
    def all_updates(self) -> str:
        """Subscription for every device's updates."""
        return f"{self.prefix}/clients/+/update"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/clients/+/status"

    def shared_updates(self, group: str) -> str:
        """Shared subscription so several aggregator processes split the update stream."""
        return f"$share/{check_name('share group', group)}/{self.all_updates}"

    def client_of(self, topic: str) -> str | None:
        """The client id in a ``clients/<id>/...`` topic of this fleet, or None."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[0] == "edgefl" and parts[1] == self.fleet and parts[2] == "clients":
            return parts[3] if _NAME.match(parts[3]) else None
        return None


def _loads(payload: bytes | str, kind: str) -> dict:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise ProtocolError(f"{kind}: not valid UTF-8 JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind}: expected a JSON object, got {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{kind}: protocol version {version!r} is not supported (this edgefl speaks "
            f"{PROTOCOL_VERSION}); upgrade the older side"
        )
    return obj


def _dumps(obj: dict) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, **obj}, separators=(",", ":"), allow_nan=False).encode()


def _number(obj: dict, key: str, kind: str, *, lo: float, hi: float = math.inf, integer=False):
    value = obj.get(key)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (lo <= value <= hi):
        want = "an integer" if integer else "a number"
        raise ProtocolError(f"{kind}: {key!r} must be {want} in [{lo}, {hi}], got {value!r}")
    return value


#: Mechanisms where the device adds the noise and pays from its own budget (replace-one epsilon).
LOCAL_MECHANISMS = ("laplace", "discrete-laplace", "gaussian")
#: Every mechanism a round may announce.
MECHANISMS = ("none", "central-gaussian") + LOCAL_MECHANISMS


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of one round's updates (see :mod:`edgefl.device.privacy`).

    mechanism: "none"; "central-gaussian" (the device clips in L2 to ``clip``, the server adds the
    noise and accounts); or a local one, where ``epsilon`` is the replace-one epsilon one update
    costs the device: "laplace" (L1 clip, float Laplace of scale 2 clip / epsilon),
    "discrete-laplace" (the same on a power-of-two grid from a ChaCha20 stream) or "gaussian"
    (L2 clip, analytic Gaussian for sensitivity 2 clip and ``delta``).
    """

    mechanism: str = "none"
    epsilon: float = 1.0
    delta: float = 1e-5
    clip: float = 1.0


@dataclass(frozen=True)
class CompressionConfig:
    """How a device sparsifies and quantizes its update (see :mod:`edgefl.device.compression`).

    method: "none", "topk" (with error feedback), "threshold" or "randomk";
    values: "f32", "f16", "int8" or "ternary".
    """

    method: str = "none"
    density: float = 1.0
    tau: float = 0.0
    values: str = "f32"


@dataclass(frozen=True)
class TrainingConfig:
    """Local training a selected device runs in one round."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0  # FedProx proximal term towards the round's global weights
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    @classmethod
    def from_dict(cls, obj: dict) -> "TrainingConfig":
        kind = "round config"
        if not isinstance(obj, dict):
            raise ProtocolError(f"{kind}: expected an object")
        try:
            privacy = PrivacyConfig(**obj.get("privacy", {}))
            compression = CompressionConfig(**obj.get("compression", {}))
            rest = {k: v for k, v in obj.items() if k not in ("privacy", "compression")}
            config = cls(privacy=privacy, compression=compression, **rest)
        except TypeError as exc:
            raise ProtocolError(f"{kind}: {exc}") from None
        d = asdict(config)
        _number(d, "epochs", kind, lo=1, hi=1000, integer=True)
        _number(d, "batch_size", kind, lo=1, hi=1 << 20, integer=True)
        for key in ("lr", "momentum", "weight_decay", "mu"):
            _number(d, key, kind, lo=0.0, hi=1e6)
        # A mechanism this version does not know still parses: the device declines the round
        # and says so in its status, instead of ignoring the announcement.
        if not isinstance(privacy.mechanism, str) or not _NAME.match(privacy.mechanism):
            raise ProtocolError(f"{kind}: privacy mechanism {privacy.mechanism!r} is not a name")
        if compression.method not in ("none", "topk", "threshold", "randomk"):
            raise ProtocolError(f"{kind}: unknown compression method {compression.method!r}")
        if compression.values not in ("f32", "f16", "int8", "ternary"):
            raise ProtocolError(f"{kind}: unknown value encoding {compression.values!r}")
        # Checked here, where server and device both parse it: a server must not announce a
        # config every device would refuse.
        density, tau = compression.density, compression.tau
        if isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not 0.0 < density <= 1.0:
            raise ProtocolError(f"{kind}: compression density must be in (0, 1], got {density!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) \
                or not (math.isfinite(tau) and tau >= 0):
            raise ProtocolError(f"{kind}: compression tau must be a finite number >= 0, "
                                f"got {tau!r}")
        return config


@dataclass(frozen=True)
class RoundAnnouncement:
    """Retained on ``edgefl/<fleet>/round``: what the current round is and who takes part.

    state: "open" (selected devices train and send), "closed" (aggregating; send nothing) or
    "finished" (the run is over: devices keep serving the last model and stop training).
    ``selected`` None means every device. ``randomk_seed`` is the server's seed for
    data-independent random-k sparsification, the same for every device in the round.

    ``max_staleness`` marks a round of buffered asynchronous aggregation (FedBuff): the server
    accepts an update of this round or of any earlier one, from any device, as long as the model
    version it was trained on is at most ``max_staleness`` versions behind ``model_version``.
    None (absent from the JSON) in synchronous rounds, where only updates of this round count.
    """

    round_id: int
    model_version: int
    deadline: float  # Unix time, seconds
    config: TrainingConfig = field(default_factory=TrainingConfig)
    selected: tuple[str, ...] | None = None
    randomk_seed: int = 0
    state: str = "open"
    max_staleness: int | None = None

    def is_selected(self, client_id: str) -> bool:
        return self.state == "open" and (self.selected is None or client_id in self.selected)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["selected"] = None if self.selected is None else list(self.selected)
        if self.max_staleness is None:
            del d["max_staleness"]  # synchronous rounds say what they said before the field
        return _dumps(d)

    @classmethod
    def from_json(cls, payload: bytes | str) -> "RoundAnnouncement":
        kind = "round announcement"
        obj = _loads(payload, kind)
        round_id = _number(obj, "round_id", kind, lo=0, hi=2**32 - 1, integer=True)
        version = _number(obj, "model_version", kind, lo=0, hi=2**32 - 1, integer=True)
        deadline = _number(obj, "deadline", kind, lo=0.0)
        seed = _number(obj, "randomk_seed", kind, lo=0, hi=2**64 - 1, integer=True)
        state = obj.get("state")
        if state not in ("open", "closed", "finished"):
            raise ProtocolError(f"{kind}: unknown state {state!r}")
        selected = obj.get("selected")
        if selected is not None:
            if not isinstance(selected, list):
                raise ProtocolError(f"{kind}: 'selected' must be a list of client ids or null")
            selected = tuple(check_name("client id", c) for c in selected)
        config = TrainingConfig.from_dict(obj.get("config", {}))
        staleness = None if obj.get("max_staleness") is None else \
            _number(obj, "max_staleness", kind, lo=0, hi=2**32 - 1, integer=True)
        return cls(round_id, version, float(deadline), config, selected, seed, state, staleness)


@dataclass(frozen=True)
class Receipt:
    """Server -> device on ``clients/<id>/receipt``: what became of one update.

    status: "accepted" (stored durably, counts in its round) or "rejected" (with a reason a
    person can act on; the device drops the update from its outbox either way).
    """

    round_id: int
    update_id: int
    status: str
    reason: str = ""

    def to_json(self) -> bytes:
        # One per update the server ingests: the fields by hand, not dataclasses.asdict (which
        # copies recursively, and cost a fifth of the server's time per update).
        return _dumps({"round_id": self.round_id, "update_id": self.update_id,
                       "status": self.status, "reason": self.reason})

    @classmethod
    def from_json(cls, payload: bytes | str) -> "Receipt":
        kind = "receipt"
        obj = _loads(payload, kind)
        round_id = _number(obj, "round_id", kind, lo=0, hi=2**32 - 1, integer=True)
        update_id = _number(obj, "update_id", kind, lo=0, hi=2**64 - 1, integer=True)
        status = obj.get("status")
        if status not in ("accepted", "rejected"):
            raise ProtocolError(f"{kind}: unknown status {status!r}")
        reason = obj.get("reason", "")
        if not isinstance(reason, str):
            raise ProtocolError(f"{kind}: 'reason' must be a string")
        return cls(round_id, update_id, status, reason)


@dataclass(frozen=True)
class DeviceStatus:
    """Retained on ``clients/<id>/status``: "online" with capabilities, or "offline" (Last Will).

    Capabilities the server reads (others are informational):

    ``mechanisms``
        The privacy mechanisms the device takes part with; the server selects it only for rounds
        announcing one of them. Absent: every mechanism of :data:`MECHANISMS`.
    ``available``, ``unavailable``
        False with a reason when the device cannot take part in any round (its privacy budget is
        spent, it has no samples); the server stops selecting it until it says True again.
    ``declined``
        ``{"round_id": r, "reason": "..."}``: the device was selected for round ``r`` and will not
        answer (e.g. an announced mechanism it does not accept); the server stops waiting for it.
    """

    state: str
    capabilities: dict[str, Any] = field(default_factory=dict)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return tuple(self.capabilities.get("mechanisms", MECHANISMS))

    @property
    def available(self) -> bool:
        return self.state == "online" and bool(self.capabilities.get("available", True))

    @property
    def declined_round(self) -> int | None:
        declined = self.capabilities.get("declined")
        return None if declined is None else declined["round_id"]

    def to_json(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, payload: bytes | str) -> "DeviceStatus":
        kind = "device status"
        obj = _loads(payload, kind)
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise ProtocolError(f"{kind}: unknown state {state!r}")
        caps = obj.get("capabilities", {})
        if not isinstance(caps, dict):
            raise ProtocolError(f"{kind}: 'capabilities' must be an object")
        mechanisms = caps.get("mechanisms", [])
        if not isinstance(mechanisms, list) or not all(isinstance(m, str) for m in mechanisms):
            raise ProtocolError(f"{kind}: 'mechanisms' must be a list of names")
        if not isinstance(caps.get("available", True), bool):
            raise ProtocolError(f"{kind}: 'available' must be true or false")
        declined = caps.get("declined")
        if declined is not None:
            if not isinstance(declined, dict) or not isinstance(declined.get("reason"), str):
                raise ProtocolError(f"{kind}: 'declined' must be an object with a round_id and "
                                    "a reason")
            _number(declined, "round_id", kind, lo=0, hi=2**32 - 1, integer=True)
        return cls(state, caps)
