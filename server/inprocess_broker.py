"""A small MQTT v5 broker that runs inside the Python process, for a start with nothing installed.

``edgefl server`` and ``edgefl simulate`` use Mosquitto when it is installed and fall back to this
broker otherwise, so a first run needs no system package. It implements what edgefl's devices and
server use, and nothing more:

* MQTT 5.0 only (paho-mqtt with ``protocol=MQTTv5``); other protocol levels get CONNACK 0x84;
* QoS 0 and 1 (Maximum QoS 1 is announced in CONNACK; a QoS 2 publish is accepted and delivered
  as QoS 1), retained messages, Last Will, ``+``/``#`` wildcards, ``$share/<group>/`` shared
  subscriptions (one member per group receives each message);
* persistent sessions: ``clean_start=False`` with a Session Expiry Interval keeps subscriptions and
  queues QoS 1 messages while the client is away; unacknowledged messages are resent with DUP;
* keep-alive enforcement and a maximum packet size.

It keeps everything in memory (a restart loses retained messages and sessions), has no
authentication and listens on loopback only: production and the test suite use Mosquitto.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# Property identifier -> wire type (MQTT 5.0, section 2.2.2.2).
_PROPERTY_TYPES = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint",
    0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "byte", 0x18: "u32",
    0x19: "byte", 0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16", 0x22: "u16", 0x23: "u16",
    0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "u32", 0x28: "byte", 0x29: "byte", 0x2A: "byte",
}
_SESSION_EXPIRY, _TOPIC_ALIAS, _SUBSCRIPTION_ID, _MAX_PACKET = 0x11, 0x23, 0x0B, 0x27


class MalformedPacket(ValueError):
    """A client sent bytes that are not valid MQTT 5.0; its connection is closed."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


class _Reader:
    """Reads MQTT fields from one packet body, raising MalformedPacket past its end."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedPacket("packet shorter than its fields")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("!I", self.take(4))[0]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError:
            raise MalformedPacket("string is not UTF-8") from None

    def properties(self) -> list[tuple[int, object]]:
        end = self.varint() + self.pos
        props = []
        while self.pos < end:
            pid = self.varint()
            kind = _PROPERTY_TYPES.get(pid)
            if kind is None:
                raise MalformedPacket(f"unknown property 0x{pid:02x}")
            if kind == "pair":
                value = (self.string(), self.string())
            else:
                value = {"byte": self.byte, "u16": self.u16, "u32": self.u32,
                         "varint": self.varint, "str": self.string, "bin": self.binary}[kind]()
            props.append((pid, value))
        if self.pos != end:
            raise MalformedPacket("properties overrun their length")
        return props

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)


def _encode_properties(props) -> bytes:
    body = bytearray()
    for pid, value in props:
        body += _varint(pid)
        kind = _PROPERTY_TYPES[pid]
        if kind == "byte":
            body.append(value)
        elif kind == "u16":
            body += struct.pack("!H", value)
        elif kind == "u32":
            body += struct.pack("!I", value)
        elif kind == "varint":
            body += _varint(value)
        elif kind == "pair":
            body += _string(value[0]) + _string(value[1])
        else:
            body += _string(value)
    return _varint(len(body)) + bytes(body)


def _packet(kind: int, body: bytes, flags: int = 0) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` with MQTT's ``+`` and ``#`` wildcards."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # $SYS-style topics are not matched by a leading wildcard
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: list = field(default_factory=list)


@dataclass
class _Subscription:
    qos: int
    no_local: bool
    retain_as_published: bool


@dataclass
class _Session:
    client_id: str
    expiry: int = 0
    subscriptions: dict = field(default_factory=dict)  # plain filter -> _Subscription
    shared: dict = field(default_factory=dict)  # (group, filter) -> _Subscription
    inflight: dict = field(default_factory=dict)  # packet id -> _Message (QoS 1, unacked)
    queued: deque = field(default_factory=deque)  # messages waiting for a connection
    connection: "_Connection | None" = None
    disconnected_at: float = 0.0
    _ids: "itertools.count" = field(default_factory=lambda: itertools.count(1))

    def next_packet_id(self) -> int:
        while True:
            pid = next(self._ids) % 65536
            if pid and pid not in self.inflight:
                return pid


class _Connection:
    """One client's network connection, served by one asyncio task."""

    def __init__(self, broker: "InProcessBroker", reader, writer):
        self.broker, self.reader, self.writer = broker, reader, writer
        self.session: _Session | None = None
        self.will: _Message | None = None
        self.keepalive = 0
        self.closed = False

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def deliver(self, message: _Message, qos: int, retain: bool) -> None:
        session = self.session
        qos = min(qos, message.qos)
        flags = qos << 1 | int(retain)
        body = _string(message.topic)
        if qos:
            pid = session.next_packet_id()
            session.inflight[pid] = _Message(message.topic, message.payload, qos, retain, message.properties)
            body += struct.pack("!H", pid)
        body += _encode_properties(message.properties) + message.payload
        self.send(_packet(PUBLISH, body, flags))

    async def read_packet(self):
        first = await self.reader.readexactly(1)
        length, shift = 0, 0
        for _ in range(4):
            byte = (await self.reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            raise MalformedPacket("remaining length longer than 4 bytes")
        if length > self.broker.max_packet_size:
            raise MalformedPacket(f"packet of {length} bytes exceeds the maximum {self.broker.max_packet_size}")
        return first[0] >> 4, first[0] & 0x0F, await self.reader.readexactly(length)

    async def serve(self) -> None:
        clean_exit = False
        try:
            kind, _, body = await asyncio.wait_for(self.read_packet(), timeout=10)
            if kind != CONNECT or not self.on_connect(body):
                return
            while not self.closed:
                timeout = self.keepalive * 1.5 if self.keepalive else None
                kind, flags, body = await asyncio.wait_for(self.read_packet(), timeout=timeout)
                if kind == DISCONNECT:
                    reason = body[0] if body else 0
                    clean_exit = reason != 0x04  # 0x04: disconnect *with* Will message
                    return
                self.on_packet(kind, flags, _Reader(body))
                await self.writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        except MalformedPacket as exc:
            log.warning("in-process broker: closing %s: %s",
                        self.session.client_id if self.session else "a client", exc)
        finally:
            self.broker.on_closed(self, publish_will=not clean_exit)
            self.closed = True
            self.writer.close()

    def on_connect(self, body: bytes) -> bool:
        r = _Reader(body)
        name, level = r.string(), r.byte()
        if level != 5:
            # Answer in the client's own version: 3.1.1's "unacceptable protocol version" (0x01).
            self.send(_packet(CONNACK, b"\x00\x01" if level in (3, 4) else b"\x00\x84\x00"))
            return False
        if name != "MQTT":
            raise MalformedPacket(f"protocol name {name!r} is not MQTT")
        flags = r.byte()
        self.keepalive = r.u16()
        props = dict((pid, v) for pid, v in r.properties() if pid != 0x26)
        client_id = r.string() or f"edgefl-auto-{id(self):x}"
        if flags & 0x04:
            will_props = [p for p in r.properties() if p[0] != 0x18]
            topic, payload = r.string(), r.binary()
            self.will = _Message(topic, payload, min((flags >> 3) & 3, 1), bool(flags & 0x20), will_props)
        if flags & 0x80:
            r.string()  # user name: this broker does not authenticate
        if flags & 0x40:
            r.binary()  # password
        present = self.broker.attach(self, client_id, clean=bool(flags & 0x02),
                                     expiry=props.get(_SESSION_EXPIRY, 0))
        ack_props = [(0x24, 1), (0x2A, 1), (0x27, self.broker.max_packet_size)]
        self.send(_packet(CONNACK, bytes([int(present), 0]) + _encode_properties(ack_props)))
        self.broker.resume(self.session)
        return True

    def on_packet(self, kind: int, flags: int, r: _Reader) -> None:
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            topic = r.string()
            pid = r.u16() if qos else 0
            props = [p for p in r.properties() if p[0] not in (_TOPIC_ALIAS, _SUBSCRIPTION_ID)]
            if not topic or "+" in topic or "#" in topic:
                raise MalformedPacket(f"invalid topic name {topic!r} in PUBLISH")
            self.broker.publish(_Message(topic, r.rest(), min(qos, 1), bool(flags & 1), props), self)
            if qos == 1:
                self.send(_packet(PUBACK, struct.pack("!H", pid)))
            elif qos == 2:
                self.send(_packet(PUBREC, struct.pack("!H", pid)))
        elif kind == PUBACK:
            self.session.inflight.pop(r.u16(), None)
        elif kind == PUBREL:
            self.send(_packet(PUBCOMP, struct.pack("!H", r.u16())))
        elif kind == SUBSCRIBE:
            pid = r.u16()
            r.properties()
            codes = []
            while r.pos < len(r.data):
                topic_filter, options = r.string(), r.byte()
                codes.append(self.broker.subscribe(self, topic_filter, options))
            self.send(_packet(SUBACK, struct.pack("!H", pid) + _encode_properties([]) + bytes(codes)))
        elif kind == UNSUBSCRIBE:
            pid = r.u16()
            r.properties()
            codes = []
            while r.pos < len(r.data):
                codes.append(self.broker.unsubscribe(self.session, r.string()))
            self.send(_packet(UNSUBACK, struct.pack("!H", pid) + _encode_properties([]) + bytes(codes)))
        elif kind == PINGREQ:
            self.send(_packet(PINGRESP, b""))
        elif kind in (PUBREC, PUBCOMP):
            pass  # never sent QoS 2
        else:
            raise MalformedPacket(f"unexpected packet type {kind}")


class InProcessBroker:
    """An MQTT v5 broker on a loopback port, served by an asyncio loop on a daemon thread.

    Parameters
    ----------
    port : int, optional
        Port to listen on; 0 (the default) picks a free one.
    max_packet_size : int
        Largest packet accepted, in bytes; a larger one closes the sender's connection.

    Same surface as :class:`edgefl_server.broker.MosquittoBroker`: ``start()``, ``stop()``,
    ``url``, ``host``, ``port``, and use as a context manager.
    """

    def __init__(self, port: int = 0, *, max_packet_size: int = 16 << 20):
        self.host, self.port = "127.0.0.1", port
        self.max_packet_size = max_packet_size
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Message] = {}
        self._share_turn: dict[tuple[str, str], int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> "InProcessBroker":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self.host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except OSError as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="edgefl-inprocess-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"in-process MQTT broker could not listen on {self.host}:{self.port}: "
                               f"{failure[0] if failure else 'timed out'}")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            for session in list(self._sessions.values()):
                if session.connection:
                    session.connection.writer.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    close = stop

    def __enter__(self) -> "InProcessBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _accept(self, reader, writer) -> None:
        await _Connection(self, reader, writer).serve()

    # -- sessions (all on the loop thread) ---------------------------------------------------
    def attach(self, conn: _Connection, client_id: str, *, clean: bool, expiry: int) -> bool:
        now = time.monotonic()
        for cid, s in list(self._sessions.items()):  # forget sessions that have expired
            if s.connection is None and now - s.disconnected_at > s.expiry:
                del self._sessions[cid]
        session = self._sessions.get(client_id)
        if session and session.connection:  # session take-over (MQTT 5.0, 3.1.4-3)
            old = session.connection
            old.send(_packet(DISCONNECT, b"\x8e" + _encode_properties([])))
            old.closed = True
            old.will = None
            old.writer.close()
        present = session is not None and not clean
        if not present:
            session = _Session(client_id)
            self._sessions[client_id] = session
        session.expiry, session.connection = expiry, conn
        conn.session = session
        return present

    def resume(self, session: _Session) -> None:
        """Resend unacknowledged messages (DUP) and flush what queued while the client was away."""
        conn = session.connection
        for pid, msg in list(session.inflight.items()):
            body = _string(msg.topic) + struct.pack("!H", pid) + _encode_properties(msg.properties) + msg.payload
            conn.send(_packet(PUBLISH, body, 0x08 | msg.qos << 1 | int(msg.retain)))
        while session.queued:
            msg, qos, retain = session.queued.popleft()
            conn.deliver(msg, qos, retain)

    def on_closed(self, conn: _Connection, *, publish_will: bool) -> None:
        session = conn.session
        if session is None or session.connection is not conn:
            return  # never connected, or taken over by a newer connection
        if publish_will and conn.will is not None:
            self.publish(conn.will, None)
        session.connection = None
        session.disconnected_at = time.monotonic()
        if session.expiry == 0:
            self._sessions.pop(session.client_id, None)

    # -- routing -----------------------------------------------------------------------------
    def subscribe(self, conn: _Connection, topic_filter: str, options: int) -> int:
        qos = options & 3
        sub = _Subscription(min(qos, 1), bool(options & 0x04), bool(options & 0x08))
        if topic_filter.startswith("$share/"):
            parts = topic_filter.split("/", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                return 0x8F  # topic filter invalid
            conn.session.shared[(parts[1], parts[2])] = sub
            return sub.qos
        if not topic_filter or ("#" in topic_filter and not topic_filter.endswith("#")):
            return 0x8F
        conn.session.subscriptions[topic_filter] = sub
        retain_handling = (options >> 4) & 3
        if retain_handling != 2:
            for msg in list(self._retained.values()):
                if topic_matches(topic_filter, msg.topic):
                    conn.deliver(msg, sub.qos, True)
        return sub.qos

    def unsubscribe(self, session: _Session, topic_filter: str) -> int:
        if topic_filter.startswith("$share/"):
            parts = topic_filter.split("/", 2)
            found = session.shared.pop((parts[1], parts[2]), None) if len(parts) == 3 else None
        else:
            found = session.subscriptions.pop(topic_filter, None)
        return 0x00 if found else 0x11

    def publish(self, msg: _Message, sender: _Connection | None) -> None:
        if msg.retain:
            if msg.payload:
                self._retained[msg.topic] = msg
            else:
                self._retained.pop(msg.topic, None)
        groups: dict[tuple[str, str], list[tuple[_Session, _Subscription]]] = {}
        for session in self._sessions.values():
            best = None
            for topic_filter, sub in session.subscriptions.items():
                if sub.no_local and sender is not None and sender.session is session:
                    continue
                if topic_matches(topic_filter, msg.topic) and (best is None or sub.qos > best.qos):
                    best = sub
            if best is not None:
                self._send(session, msg, best.qos, msg.retain and best.retain_as_published)
            for (group, topic_filter), sub in session.shared.items():
                if topic_matches(topic_filter, msg.topic):
                    groups.setdefault((group, topic_filter), []).append((session, sub))
        for key, members in groups.items():
            online = [m for m in members if m[0].connection is not None] or members
            turn = self._share_turn.get(key, 0)
            self._share_turn[key] = turn + 1
            session, sub = online[turn % len(online)]
            self._send(session, msg, sub.qos, False)

    def _send(self, session: _Session, msg: _Message, qos: int, retain: bool) -> None:
        if session.connection is not None:
            session.connection.deliver(msg, qos, retain)
        elif min(qos, msg.qos) == 1:
            session.queued.append((msg, qos, retain))
