"""The one MQTT connection wrapper of edgefl, used by devices and by the aggregation server.

Built on paho-mqtt 2.x the way the protocol needs it (``docs/protocol.md``, Sessions and delivery):

* MQTT v5 with a fixed client id, ``clean_start=False`` and a Session Expiry Interval, so QoS 1
  messages queued by the broker while a peer is away reach it when it returns. paho's default
  (``MQTT_CLEAN_START_FIRST_ONLY``) starts clean on the first connect of every process, which
  would throw those messages away after a reboot, so ``clean_start=False`` is passed explicitly.
* Reconnection with exponential back-off (``reconnect_delay_set``); subscriptions are renewed in
  ``on_connect`` after checking the CONNACK reason code, so a broker that lost its state still
  routes our topics after a restart.
* paho's callbacks only put events on a queue. One dispatcher thread runs the user's message
  handler and the connect hooks, never paho's network thread, so slow handlers cannot stall
  keep-alives, and an exception from a handler is logged and never reaches paho (an exception in a
  paho callback kills its network thread). A receiver of many messages (the server's ingestion)
  may instead pass an ``intake`` that only queues a message, and skip that hand-off.
* paho 2.2 builds its MQTT v5 property tables (dozens of dicts and lists) for every packet it
  receives, which cost more than the rest of receiving an update: :class:`_SharedTableProperties`
  builds them once per process. It also copies and scans its table of reason-code names for
  every ``ReasonCode`` it makes, one per PUBACK received and per QoS 0 message sent (for the
  ``on_publish`` callback): :class:`_SharedTableReasonCode` reads the table in place. The two
  take most of the network thread's time per QoS 0 message sent (a receipt) away.
* ``receive_maximum`` asks the broker (MQTT v5 Receive Maximum) for a larger window of QoS 1
  messages in flight to a receiver that acknowledges late (after storing): Mosquitto's default
  of 20 would cap each stored batch at 20 messages.
"""
from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import paho.mqtt
import paho.mqtt._packet
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

class _SharedTableProperties(Properties):
    """paho's MQTT v5 ``Properties``, with its constant tables shared by every instance.

    ``Properties.__init__`` rebuilds the same name, type and packet-type tables each time, and
    paho creates one instance for every PUBLISH and PUBACK it decodes. The tables are never
    changed after they are built, so one set serves all; the behaviour is paho's own.
    """

    _tables: dict | None = None
    _private = frozenset(("packetType", "types", "names", "properties"))

    def __init__(self, packetType):
        tables = _SharedTableProperties._tables
        if tables is None:
            super().__init__(packetType)
            _SharedTableProperties._tables = {"types": self.types, "names": self.names,
                                              "properties": self.properties}
        else:
            self.__dict__.update(tables)
            self.__dict__["packetType"] = packetType

    def clear(self):
        # paho checks each of its ~27 names; only what was set can be deleted
        for name in [n for n in self.__dict__ if n not in self._private]:
            delattr(self, name)


class _SharedTableReasonCode(ReasonCode):
    """paho's MQTT v5 ``ReasonCode``, reading its (read-only) table of names in place.

    ``ReasonCode.__init__`` copies the class's table of names into every instance and finds a
    name's code by a scan of it; paho makes one for every PUBACK it receives and every QoS 0
    message it sends. The table is a read-only mapping, so sharing it changes nothing, and
    "Success" (code 0: nearly every instance) needs no scan.
    """

    def __init__(self, packetType, aName="Success", identifier=-1):
        self.names = type(self).names
        self.packetType = packetType
        if identifier != -1:
            self.value = identifier
            self.getName()  # paho's check that the code exists for this packet type
        elif aName == "Success" and packetType != PacketTypes.DISCONNECT:
            self.value = 0
        else:
            if packetType == PacketTypes.DISCONNECT and aName == "Success":
                aName = "Normal disconnection"
            self.set(aName)


def _share_paho_tables() -> None:
    """Make paho build :class:`_SharedTableProperties` and :class:`_SharedTableReasonCode`
    (paho 2.x only; a later paho keeps its own classes)."""
    if paho.mqtt.__version__.split(".")[0] != "2":
        return
    # paho 2.0 and 2.1 build the reason-code names in each instance (2.2 made them a read-only
    # class table, which the shared variant reads): theirs stays as it is.
    share_reason_codes = isinstance(getattr(ReasonCode, "names", None), Mapping)
    for module in (paho.mqtt._packet, mqtt):
        if getattr(module, "Properties", None) is Properties:
            module.Properties = _SharedTableProperties
        if share_reason_codes and getattr(module, "ReasonCode", None) is ReasonCode:
            module.ReasonCode = _SharedTableReasonCode


_share_paho_tables()

#: A message as paho delivers it (``.topic``, ``.payload``, ``.qos``, ``.retain``, ``.mid``).
Message = mqtt.MQTTMessage


class BrokerUnreachable(ConnectionError):
    """The broker did not accept a connection within the time given to :meth:`MqttConnection.start`."""


class BrokerRefused(BrokerUnreachable):
    """The broker refused the login (bad user name or password, not authorized, banned): retrying
    cannot help, so :meth:`MqttConnection.start` raises at once."""


#: CONNACK reason codes that no retry can cure (MQTT v5, 3.2.2.2).
_FATAL_CONNACK = {0x84: "the broker does not support this MQTT version",
                  0x85: "the client id is not valid",
                  0x86: "bad user name or password",
                  0x87: "not authorized",
                  0x8A: "the login is banned",
                  0x8C: "bad authentication method"}


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens: host, port and whether the connection uses TLS."""

    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host:port``, ``mqtts://host:port`` or ``host:port`` into a :class:`BrokerAddress`.

    The port defaults to 1883 for ``mqtt`` and 8883 for ``mqtts``.

    Raises
    ------
    ValueError
        For another scheme, a missing host or a port outside 1-65535, naming the bad value.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"broker URL {url!r} is empty: use mqtt://HOST:PORT or mqtts://HOST:PORT")
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(
            f"broker URL {url!r}: scheme {parts.scheme!r} is not supported; use mqtt:// or mqtts://"
        )
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker URL {url!r}: the port must be a number in 1-65535") from None
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host: use mqtt://HOST:PORT")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"broker URL {url!r}: a path or query is not allowed, only HOST:PORT")
    if port == 0:
        raise ValueError(f"broker URL {url!r}: the port must be a number in 1-65535")
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


# Events the paho callbacks hand to the dispatcher thread.
_MESSAGE, _CONNECTED, _STOP = "message", "connected", "stop"


class MqttConnection:
    """A persistent MQTT v5 session to one broker, with a dispatcher thread for incoming messages.

    Parameters
    ----------
    client_id : str
        Fixed MQTT client id; the broker keeps this id's session (subscriptions and queued QoS 1
        messages) for ``session_expiry`` seconds while it is away.
    broker_url : str
        ``mqtt://host:port``, ``mqtts://host:port`` or ``host:port``.
    username, password : str, optional
        Credentials passed to the broker.
    tls : bool or ssl.SSLContext, optional
        True for TLS with the system's (or ``ca_certs``') trust store, an ``SSLContext`` for full
        control; by default TLS is on exactly for ``mqtts://`` URLs.
    ca_certs : str, optional
        CA bundle to verify the broker with (when ``tls`` is not an ``SSLContext``).
    session_expiry : int
        Session Expiry Interval in seconds.
    keepalive : int
        MQTT keep-alive in seconds.
    will : tuple, optional
        ``(topic, payload, qos, retain)`` the broker publishes if this client vanishes.
    subscriptions : list of (topic, qos)
        Renewed on every connect. ``qos`` may also be a paho ``SubscribeOptions``.
    on_message : callable(Message), optional
        Runs on the dispatcher thread for every incoming message; exceptions are logged.
    intake : callable(Message) -> bool, optional
        Runs first, on paho's network thread, for every incoming message: it must only queue
        the message for a thread of its own and return True, or return False to pass it to
        ``on_message``. Saves the hand-off through the dispatcher for a stream of messages;
        an exception is logged and the message goes to ``on_message``.
    manual_ack : bool
        If True, a QoS 1 message is acknowledged only when :meth:`ack` is called (after the
        handler stored it durably); a message never acknowledged is redelivered by the broker on
        the next connection.
    reconnect_delay : (float, float)
        Minimum and maximum back-off between reconnection attempts, in seconds.

    Attributes
    ----------
    connected : threading.Event
        Set while connected: after a successful CONNACK and the SUBACK of the subscriptions.
    on_connect_hooks : list of callable(session_present: bool)
        Run on the dispatcher thread after every successful connect, after the subscriptions were
        renewed (e.g. to publish a retained status or to resend an outbox).
    """

    def __init__(
        self,
        client_id: str,
        broker_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
        ca_certs: str | None = None,
        session_expiry: int = 86400,
        keepalive: int = 30,
        will: tuple | None = None,
        subscriptions=(),
        on_message: Callable[[Message], None] | None = None,
        intake: Callable[[Message], bool] | None = None,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        reconnect_delay: tuple[float, float] = (0.5, 30),
    ):
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"client id {client_id!r} must be a non-empty string")
        self.client_id = client_id
        self.address = parse_broker_url(broker_url)
        self.session_expiry = int(session_expiry)
        self.keepalive = int(keepalive)
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.intake = intake
        self.manual_ack = manual_ack
        if receive_maximum is not None and not 1 <= receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be in 1-65535, got {receive_maximum!r}")
        self.receive_maximum = receive_maximum
        self.connected = threading.Event()
        self.on_connect_hooks: list[Callable[[bool], None]] = []
        self.last_error: str | None = None
        #: Publishes the broker answered with a failure reason code (e.g. refused by its ACL).
        self.refused_publishes = 0
        #: Subscriptions the broker refused in its SUBACK.
        self.refused_subscriptions = 0
        self._refused = threading.Event()  # a CONNACK no retry can cure
        self._pending_topics: dict[int, str] = {}  # mid -> topic of QoS>0 publishes in flight
        self._refused_mids: set[int] = set()

        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._started = False
        self._session_present = False
        self._subscribe_mid: int | None = None

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        min_delay, max_delay = reconnect_delay
        client.reconnect_delay_set(min_delay=min_delay, max_delay=max_delay)
        if username is not None:
            client.username_pw_set(username, password)
        use_tls = self.address.tls if tls is None else tls
        self._tls = bool(use_tls)
        if isinstance(use_tls, ssl.SSLContext):
            client.tls_set_context(use_tls)
        elif use_tls:
            try:
                client.tls_set(ca_certs=ca_certs)
            except OSError as exc:  # ssl.SSLError included
                # ssl reports a missing CA file without its name.
                raise ValueError(f"cannot use the CA certificates {ca_certs}: {exc}") from None
        if will is not None:
            topic, payload, qos, retain = will
            client.will_set(topic, payload, qos=qos, retain=retain)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client
        self.username = username

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0,
              cancel: threading.Event | None = None) -> "MqttConnection":
        """Connect and start the network and dispatcher threads; wait up to ``timeout`` seconds,
        or until ``cancel`` is set (a SIGTERM during start-up).

        Raises
        ------
        BrokerUnreachable
            If the broker did not accept the connection and the subscriptions in time (it is
            down, refuses the credentials, fails the TLS check, ...); the threads are stopped
            again.
        """
        if self._started:
            raise RuntimeError(f"MQTT connection {self.client_id!r} is already started")
        self._started = True
        self._dispatcher = threading.Thread(
            target=self._dispatch, name=f"edgefl-mqtt-{self.client_id}", daemon=True
        )
        self._dispatcher.start()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry
        if self.receive_maximum is not None:
            properties.ReceiveMaximum = self.receive_maximum
        self._client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=self.keepalive,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self.connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self._refused.is_set():
                reason = self.last_error
                self.stop()
                raise BrokerRefused(
                    f"the MQTT broker at {self.address.url} refused the login of "
                    f"{self.username or '(anonymous)'!r} as {self.client_id!r}: {reason}; check "
                    "the user name and password (a device's are in its bundle from `edgefl fleet "
                    "add-device`; a revoked device needs a new bundle)")
            if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                break
        if not self.connected.is_set():
            reason = "start-up cancelled" if cancel is not None and cancel.is_set() else \
                self.last_error or "no answer"
            self.stop()
            raise BrokerUnreachable(
                f"could not connect to the MQTT broker at {self.address.url} as {self.client_id!r} "
                f"within {timeout:g} s ({reason}); check that the broker runs and the URL, "
                f"credentials and TLS settings are right"
            )
        return self

    def stop(self) -> None:
        """Finish the messages already received, disconnect cleanly (the Last Will is not
        published) and stop both threads.

        The dispatcher is drained first, so what a handler publishes in reaction to a message
        (a receipt, say) is queued before the DISCONNECT and goes out with it.
        """
        if not self._started:
            return
        self._started = False
        self._events.put((_STOP, None))
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(timeout=10)
        self._dispatcher = None
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - already disconnected is fine when stopping
            log.debug("disconnect of %s failed", self.client_id, exc_info=True)
        self._client.loop_stop()
        self.connected.clear()

    def __enter__(self) -> "MqttConnection":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- sending ---------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float | None = None) -> bool:
        """Publish one message.

        Without ``timeout`` it returns once paho took the message: True if it went out on the
        current connection, False if there is none right now (paho keeps a QoS 1 message and sends
        it after reconnecting while this process lives). With ``timeout`` it waits for the PUBACK
        and returns True only if the broker confirmed it in time.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0 and info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._pending_topics[info.mid] = topic
        if timeout is None:
            return info.rc == mqtt.MQTT_ERR_SUCCESS
        try:
            info.wait_for_publish(timeout)
            # A PUBACK with a failure reason code (an ACL refusal) completes the publish too.
            return info.is_published() and info.mid not in self._refused_mids
        except (RuntimeError, ValueError):
            # Not connected or paho's queue is full: not confirmed.
            return False

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now (if connected) and to the ones renewed on every reconnect.

        The broker sends the topic's retained message, if any, right after it accepts it.
        """
        if any(t == topic for t, _ in self.subscriptions):
            return
        # Replaced, not appended to: paho's network thread reads the list on reconnect.
        self.subscriptions = [*self.subscriptions, (topic, qos)]
        self._client.subscribe(topic, qos)  # not connected: the reconnect subscribes it

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription, now and from the ones renewed on reconnect."""
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t != topic]
        self._client.unsubscribe(topic)

    def ack(self, msg: Message) -> None:
        """Acknowledge ``msg`` (PUBACK) after it has been stored; only with ``manual_ack=True``."""
        if self.manual_ack and msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    # -- paho callbacks: run on paho's network thread, so they only record and enqueue -------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        try:
            if reason_code.is_failure:
                self.last_error = f"broker refused the connection: {reason_code}"
                log.warning("%s: %s", self.client_id, self.last_error)
                if reason_code.value in _FATAL_CONNACK:
                    self.last_error = (f"broker refused the connection: {reason_code} "
                                       f"({_FATAL_CONNACK[reason_code.value]})")
                    self._refused.set()
                return
            self.last_error = None
            self._session_present = bool(flags.session_present)
            if not self.subscriptions:
                self._ready()
                return
            # One SUBSCRIBE for all topics; "connected" waits for its SUBACK, so a message
            # published after start() returned cannot miss a subscription still in flight.
            _, self._subscribe_mid = client.subscribe(self.subscriptions)
        except Exception:  # noqa: BLE001 - never let an exception reach paho's network thread
            log.exception("%s: on_connect failed", self.client_id)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        try:
            if mid != self._subscribe_mid:
                return
            for (topic, _), code in zip(self.subscriptions, reason_codes):
                if code.is_failure:
                    self.refused_subscriptions += 1
                    log.error("%s: the broker refused the subscription to %s (%s); check the "
                              "broker's ACL for user %r (re-provision with `edgefl fleet`)",
                              self.client_id, topic, code, self.username)
            self._ready()
        except Exception:  # noqa: BLE001
            log.exception("%s: on_subscribe failed", self.client_id)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        try:
            topic = self._pending_topics.pop(mid, None)
            self._refused_mids.discard(mid)  # mids are reused: only this answer counts
            if reason_code is not None and reason_code.is_failure:
                self.refused_publishes += 1
                self._refused_mids.add(mid)
                log.error("%s: the broker refused the message on %s (%s): check the broker's "
                          "ACL for user %r: this login may not publish there (re-provision with "
                          "`edgefl fleet`)", self.client_id, topic, reason_code, self.username)
        except Exception:  # noqa: BLE001
            pass

    def _ready(self) -> None:
        self.connected.set()
        self._events.put((_CONNECTED, self._session_present))

    def _on_connect_fail(self, client, userdata):
        try:
            # paho does not pass the exception; say what the usual causes are.
            self.last_error = (
                "the TLS connection failed: is the broker running on that port, and does "
                "ca_certs hold the CA that signed its certificate?" if self._tls else
                "the TCP connection failed: is the broker running on that port?")
            log.debug("%s: %s", self.client_id, self.last_error)
        except Exception:  # noqa: BLE001
            pass

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        try:
            self.connected.clear()
            if self._started:
                log.info("%s: disconnected from %s (%s); reconnecting",
                         self.client_id, self.address.url, reason_code)
        except Exception:  # noqa: BLE001
            pass

    def _on_message(self, client, userdata, msg):
        try:
            if self.intake is not None:
                try:
                    if self.intake(msg):
                        return
                except Exception:  # noqa: BLE001 - the dispatcher still gets the message
                    log.exception("%s: intake of a message on %s failed", self.client_id,
                                  msg.topic)
            self._events.put((_MESSAGE, msg))
        except Exception:  # noqa: BLE001
            pass

    # -- dispatcher thread -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            kind, item = self._events.get()
            if kind == _STOP:
                return
            if kind == _CONNECTED:
                for hook in list(self.on_connect_hooks):
                    try:
                        hook(item)
                    except Exception:  # noqa: BLE001 - a hook's bug must not stop the others
                        log.exception("%s: connect hook %r failed", self.client_id, hook)
            elif self.on_message is not None:
                try:
                    self.on_message(item)
                except Exception:  # noqa: BLE001 - a handler's bug must not stop the dispatcher
                    log.exception(
                        "%s: handler for a message on %s failed%s", self.client_id, item.topic,
                        " (not acknowledged: the broker redelivers it on the next connection)"
                        if self.manual_ack and item.qos > 0 else "",
                    )
