"""edgefl.transport.mqtt against a real Mosquitto, with raw paho clients as the other side."""
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edgefl.transport.mqtt import (BrokerAddress, BrokerRefused, BrokerUnreachable, MqttConnection,
                                   parse_broker_url)

pytestmark = pytest.mark.integration


def raw_client(broker, client_id, *, on_message=None, subscribe=()):
    """A plain paho MQTT v5 client, connected and looping, as an independent peer."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        for topic in subscribe:
            c.subscribe(topic, 1)
        if not subscribe:
            subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    if on_message is not None:
        client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert subscribed.wait(5), "raw peer did not connect"
    return client


def collector():
    """An on_message callback that puts (topic, payload, retain) on a queue."""
    got = queue.Queue()
    return got, lambda c, u, msg: got.put((msg.topic, msg.payload, msg.retain))


def stop_raw(client):
    client.disconnect()
    client.loop_stop()


# -- broker URLs ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "url, expected",
    [
        ("mqtt://10.0.0.5:1884", BrokerAddress("10.0.0.5", 1884, False)),
        ("mqtts://broker.example.org", BrokerAddress("broker.example.org", 8883, True)),
        ("mqtt://localhost", BrokerAddress("localhost", 1883, False)),
        ("gateway:2000", BrokerAddress("gateway", 2000, False)),
        ("  mqtt://h:1/ ", BrokerAddress("h", 1, False)),
    ],
)
def test_parse_broker_url(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://h:1883", "scheme 'http'"),
        ("mqtt://h:99999", "1-65535"),
        ("mqtt://h:port", "1-65535"),
        ("mqtt://:1883", "no host"),
        ("", "empty"),
        ("mqtt://h:1883/topic", "path"),
    ],
)
def test_parse_broker_url_rejects_with_the_bad_value(url, message):
    with pytest.raises(ValueError, match=message):
        parse_broker_url(url)


def test_address_url_round_trips():
    address = BrokerAddress("h", 8883, True)
    assert parse_broker_url(address.url) == address


# -- connecting ----------------------------------------------------------------------------------

def test_start_fails_clearly_when_no_broker_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        conn = MqttConnection("dev-a", f"mqtt://127.0.0.1:{port}", reconnect_delay=(0.1, 0.2))
        with pytest.raises(BrokerUnreachable, match=f"127.0.0.1:{port}.*dev-a.*TCP connection failed"):
            conn.start(timeout=0.5)
    assert not conn.connected.is_set()


def test_publish_and_receive_through_the_dispatcher_thread(broker):
    got, on_raw = collector()
    peer = raw_client(broker, "peer", on_message=on_raw, subscribe=["t/out"])
    handled = queue.Queue()

    def handler(msg):
        handled.put((msg.topic, msg.payload, threading.current_thread().name))

    conn = MqttConnection("dev-a", broker.url, subscriptions=[("t/in", 1)], on_message=handler)
    with conn:
        assert conn.connected.is_set()
        assert conn.publish("t/out", b"hello", qos=1, timeout=5) is True
        assert got.get(timeout=5) == ("t/out", b"hello", False)
        peer.publish("t/in", b"to-device", qos=1).wait_for_publish(5)
        topic, payload, thread = handled.get(timeout=5)
        assert (topic, payload) == ("t/in", b"to-device")
        assert thread == "edgefl-mqtt-dev-a"  # never paho's network thread
    stop_raw(peer)


def test_a_failing_handler_is_logged_and_the_next_message_still_arrives(broker, caplog):
    handled = queue.Queue()

    def handler(msg):
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        handled.put(msg.payload)

    conn = MqttConnection("dev-a", broker.url, subscriptions=[("t/in", 1)], on_message=handler)
    peer = raw_client(broker, "peer")
    with conn:
        peer.publish("t/in", b"boom", qos=1).wait_for_publish(5)
        peer.publish("t/in", b"fine", qos=1).wait_for_publish(5)
        assert handled.get(timeout=5) == b"fine"
        assert conn.connected.is_set()
    assert "handler bug" in caplog.text
    stop_raw(peer)


def test_stop_lets_a_running_handler_finish_and_its_reply_go_out(broker):
    got, on_raw = collector()
    peer = raw_client(broker, "peer", on_message=on_raw, subscribe=["t/reply"])
    handling = threading.Event()

    def handler(msg):
        handling.set()
        time.sleep(0.3)  # still working when stop() is called
        conn.publish("t/reply", b"receipt for " + msg.payload, qos=1)

    conn = MqttConnection("server", broker.url, subscriptions=[("t/in", 1)], on_message=handler)
    conn.start(timeout=5)
    peer.publish("t/in", b"update-1", qos=1).wait_for_publish(5)
    assert handling.wait(5)
    conn.stop()
    assert got.get(timeout=5)[:2] == ("t/reply", b"receipt for update-1")
    stop_raw(peer)


def test_last_will_is_published_when_the_process_is_killed(broker):
    got, on_raw = collector()
    peer = raw_client(broker, "watcher", on_message=on_raw, subscribe=["s/dev-a"])
    script = (
        "import sys, time; from edgefl.transport.mqtt import MqttConnection; "
        f"MqttConnection('dev-a', {broker.url!r}, will=('s/dev-a', b'offline', 1, True)).start(5); "
        "print('up', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "up\n"
        process.send_signal(signal.SIGKILL)  # a crash: no DISCONNECT packet
        process.wait(10)
        topic, payload, retain = got.get(timeout=10)
        assert (topic, payload, retain) == ("s/dev-a", b"offline", False)
    finally:
        process.kill()
        process.stdout.close()
    stop_raw(peer)
    later, on_later = collector()
    newcomer = raw_client(broker, "newcomer", on_message=on_later, subscribe=["s/dev-a"])
    assert later.get(timeout=5) == ("s/dev-a", b"offline", True)  # the Will was retained
    stop_raw(newcomer)


def test_clean_stop_does_not_publish_the_will(broker):
    got, on_raw = collector()
    peer = raw_client(broker, "watcher", on_message=on_raw, subscribe=["s/dev-a"])
    with MqttConnection("dev-a", broker.url, will=("s/dev-a", b"offline", 1, True)) as conn:
        conn.publish("s/dev-a", b"online", qos=1, retain=True, timeout=5)
    assert got.get(timeout=5)[1] == b"online"
    # The same client id connecting again means the broker is done with the first session (a
    # Will would have gone out by then); its marker arrives after anything that did.
    with MqttConnection("dev-a", broker.url) as again:
        again.publish("s/dev-a", b"marker", qos=1, timeout=5)
    assert got.get(timeout=10)[1] == b"marker"
    stop_raw(peer)


# -- sessions and reconnection -------------------------------------------------------------------

def test_messages_sent_while_away_arrive_after_restart_of_the_process(broker):
    """clean_start=False + Session Expiry: the broker queues QoS 1 messages for a stopped client."""
    first = queue.Queue()
    conn = MqttConnection("dev-a", broker.url, subscriptions=[("t/in", 1)], on_message=first.put)
    conn.start(timeout=5)
    conn.stop()
    peer = raw_client(broker, "peer")
    peer.publish("t/in", b"queued while away", qos=1).wait_for_publish(5)
    again = queue.Queue()
    conn = MqttConnection("dev-a", broker.url, subscriptions=[("t/in", 1)], on_message=again.put)
    with conn:
        assert again.get(timeout=5).payload == b"queued while away"
    assert first.empty()
    stop_raw(peer)


def test_reconnects_after_a_broker_restart_and_renews_subscriptions(broker):
    handled = queue.Queue()
    reconnects = queue.Queue()
    conn = MqttConnection(
        "dev-a", broker.url, subscriptions=[("t/in", 1)], on_message=handled.put,
        reconnect_delay=(0.1, 0.5),
    )
    conn.on_connect_hooks.append(reconnects.put)
    with conn:
        assert reconnects.get(timeout=5) is False  # a new session the first time
        broker.restart()
        assert reconnects.get(timeout=10) is True  # the persisted session is resumed
        assert conn.connected.wait(5)
        peer = raw_client(broker, "peer")
        peer.publish("t/in", b"after restart", qos=1).wait_for_publish(5)
        assert handled.get(timeout=5).payload == b"after restart"
        stop_raw(peer)


def test_publish_without_a_connection_reports_false_and_is_delivered_after_reconnect(broker):
    got, on_raw = collector()
    conn = MqttConnection("dev-a", broker.url, reconnect_delay=(0.1, 0.3))
    with conn:
        broker.stop()
        assert _wait_until(lambda: not conn.connected.is_set())
        assert conn.publish("t/out", b"late", qos=1, timeout=0.2) is False
        broker.start()
        peer = raw_client(broker, "peer", on_message=on_raw, subscribe=["t/out"])
        assert conn.connected.wait(10)
        assert got.get(timeout=5)[:2] == ("t/out", b"late")
        stop_raw(peer)


def _wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_manual_ack_redelivers_a_message_that_was_not_acknowledged(broker):
    received = queue.Queue()
    conn = MqttConnection("server", broker.url, subscriptions=[("t/up", 1)],
                          on_message=received.put, manual_ack=True)
    conn.start(timeout=5)
    peer = raw_client(broker, "peer")
    peer.publish("t/up", b"update-1", qos=1).wait_for_publish(5)
    assert received.get(timeout=5).payload == b"update-1"
    conn.stop()  # crashed before storing it: no PUBACK was sent

    redelivered = queue.Queue()
    conn = MqttConnection("server", broker.url, subscriptions=[("t/up", 1)],
                          on_message=redelivered.put, manual_ack=True)
    with conn:
        msg = redelivered.get(timeout=5)
        assert msg.payload == b"update-1"
        conn.ack(msg)
    # Acknowledged now: a third session receives nothing.
    third = queue.Queue()
    with MqttConnection("server", broker.url, subscriptions=[("t/up", 1)],
                        on_message=third.put, manual_ack=True) as conn:
        # A redelivery comes as the session resumes, before a message published after it.
        peer.publish("t/up", b"marker", qos=1).wait_for_publish(5)
        msg = third.get(timeout=10)
        assert msg.payload == b"marker"
        conn.ack(msg)
    stop_raw(peer)


def test_intake_takes_messages_on_the_network_thread_with_their_v5_properties(broker):
    """Properties decoded with paho's tables shared between packets are still each packet's own."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    import paho.mqtt._packet
    from edgefl.transport.mqtt import _SharedTableProperties

    assert paho.mqtt._packet.Properties is _SharedTableProperties
    taken, handled = queue.Queue(), queue.Queue()

    def intake(msg):
        if msg.topic == "t/boom":
            raise RuntimeError("a bug in the intake")
        if msg.topic.startswith("t/take"):
            taken.put((threading.current_thread().name, msg))
            return True
        return False

    conn = MqttConnection("intake", broker.url, subscriptions=[("t/#", 1)], intake=intake,
                          on_message=lambda m: handled.put(m.topic)).start()
    peer = raw_client(broker, "peer")
    try:
        first = Properties(PacketTypes.PUBLISH)
        first.MessageExpiryInterval = 300
        first.UserProperty = [("k", "v1")]
        second = Properties(PacketTypes.PUBLISH)
        second.ContentType = "application/octet-stream"
        for topic, props in (("t/take/1", first), ("t/take/2", second), ("t/other", None),
                             ("t/boom", None)):
            peer.publish(topic, b"x", qos=1, properties=props).wait_for_publish(5)
        (thread1, m1), (thread2, m2) = taken.get(timeout=10), taken.get(timeout=10)
        assert not thread1.startswith("edgefl-mqtt")  # not the dispatcher: paho's own thread
        assert (m1.topic, m1.properties.UserProperty) == ("t/take/1", [("k", "v1")])
        assert 0 < m1.properties.MessageExpiryInterval <= 300
        assert not hasattr(m1.properties, "ContentType")
        assert m2.properties.ContentType == "application/octet-stream"
        assert not hasattr(m2.properties, "UserProperty")
        # declined, and failing, intakes hand the message to the dispatcher
        assert {handled.get(timeout=10), handled.get(timeout=10)} == {"t/other", "t/boom"}
        assert handled.empty() and taken.empty()
    finally:
        stop_raw(peer)
        conn.stop()



@pytest.mark.parametrize("window, expected", [(None, 20), (64, 64)])
def test_receive_maximum_sets_how_many_unacknowledged_messages_the_broker_sends(
        broker, window, expected):
    """A receiver that acknowledges late gets Mosquitto's 20 messages in flight by default, and
    as many as its Receive Maximum asks for."""
    got = queue.Queue()
    name = f"late-acker-{window}"
    conn = MqttConnection(name, broker.url, subscriptions=[("t/window", 1)], manual_ack=True,
                          receive_maximum=window, on_message=got.put).start()
    peer = raw_client(broker, f"peer-{window}")
    try:
        for i in range(100):
            peer.publish("t/window", str(i).encode(), qos=1)
        held = [got.get(timeout=10) for _ in range(expected)]
        with pytest.raises(queue.Empty):  # nothing more until something is acknowledged
            got.get(timeout=1.0)
        conn.ack(held[0])
        assert got.get(timeout=10).payload == str(expected).encode()
        for msg in held[1:]:
            conn.ack(msg)
    finally:
        stop_raw(peer)
        conn.stop()


@pytest.mark.parametrize("receive_maximum", [0, 65536, -1])
def test_receive_maximum_outside_the_mqtt_range_is_refused(receive_maximum):
    with pytest.raises(ValueError, match="receive_maximum"):
        MqttConnection("x", "mqtt://127.0.0.1:1", receive_maximum=receive_maximum)


@pytest.mark.parametrize("packet, name, identifier", [
    ("PUBACK", "Success", -1), ("CONNACK", "Success", -1), ("DISCONNECT", "Success", -1),
    ("PUBACK", "Not authorized", -1), ("SUBACK", "Granted QoS 1", -1), ("PUBACK", "", 0),
    ("PUBACK", "", 135), ("PUBACK", "", 16), ("DISCONNECT", "", 4), ("CONNACK", "", 134)])
def test_shared_table_reason_codes_behave_as_pahos(packet, name, identifier):
    """The reason code paho builds here has paho's own value, name, bytes and failure flag."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    import paho.mqtt.client as paho_client
    from edgefl.transport.mqtt import _SharedTableReasonCode

    assert paho_client.ReasonCode is _SharedTableReasonCode
    kind = getattr(PacketTypes, packet)
    args = (kind, name or "Success", identifier)
    ours, pahos = _SharedTableReasonCode(*args), ReasonCode(*args)
    assert (ours.value, ours.getName(), ours.pack(), ours.is_failure, str(ours)) == \
        (pahos.value, pahos.getName(), pahos.pack(), pahos.is_failure, str(pahos))
    assert ours == pahos and ours == pahos.value


def test_shared_table_reason_codes_refuse_what_paho_refuses():
    from paho.mqtt.packettypes import PacketTypes

    from edgefl.transport.mqtt import _SharedTableReasonCode

    with pytest.raises(KeyError):
        _SharedTableReasonCode(PacketTypes.PUBACK, "No such reason")
    with pytest.raises(KeyError):
        _SharedTableReasonCode(PacketTypes.PUBACK, identifier=3)

def test_rejects_an_empty_client_id():
    with pytest.raises(ValueError, match="client id"):
        MqttConnection("", "mqtt://127.0.0.1:1883")


# -- credentials and TLS, against a Mosquitto that demands them ----------------------------------

@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory):
    """Mosquitto with a password file, a plain listener and a TLS listener (own CA, SAN 127.0.0.1)."""
    import getpass
    import shutil
    import subprocess

    from edgefl_server.mosquitto import find_mosquitto, free_port

    d = tmp_path_factory.mktemp("secured")

    def run(*command):
        subprocess.run(command, cwd=d, check=True, capture_output=True, timeout=60)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "1", "-subj", "/CN=edgefl test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    run(shutil.which("mosquitto_passwd", path="/usr/bin:/usr/sbin:/usr/local/bin") or "mosquitto_passwd",
        "-c", "-b", "passwd", "device-7", "s3cret")
    plain, tls = free_port(), free_port()
    (d / "mosquitto.conf").write_text("\n".join([
        f"user {getpass.getuser()}", "allow_anonymous false", f"password_file {d}/passwd",
        f"listener {plain} 127.0.0.1",
        f"listener {tls} 127.0.0.1", f"cafile {d}/ca.pem", f"certfile {d}/server.pem",
        f"keyfile {d}/server.key", "log_dest stderr", ""]))
    process = subprocess.Popen([find_mosquitto(), "-c", str(d / "mosquitto.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_until(lambda: _listening(plain) and _listening(tls), 10), "mosquitto did not start"
        yield {"plain": f"mqtt://127.0.0.1:{plain}", "tls": f"mqtts://127.0.0.1:{tls}",
               "ca": str(d / "ca.pem")}
    finally:
        process.terminate()
        process.wait(10)


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_credentials_are_passed_to_the_broker(secured_broker):
    with MqttConnection("dev-a", secured_broker["plain"], username="device-7", password="s3cret") as conn:
        assert conn.publish("t/x", b"1", qos=1, timeout=5)


def test_wrong_credentials_fail_with_the_brokers_reason(secured_broker):
    conn = MqttConnection("dev-a", secured_broker["plain"], username="device-7", password="wrong",
                          reconnect_delay=(0.1, 0.2))
    with pytest.raises(BrokerUnreachable, match="refused the connection: Not authorized"):
        conn.start(timeout=2)


def test_tls_with_the_brokers_ca(secured_broker):
    with MqttConnection("dev-a", secured_broker["tls"], username="device-7", password="s3cret",
                        ca_certs=secured_broker["ca"]) as conn:
        assert conn.address.tls
        assert conn.publish("t/x", b"1", qos=1, timeout=5)


def test_tls_refuses_a_broker_it_cannot_verify(secured_broker):
    conn = MqttConnection("dev-a", secured_broker["tls"], username="device-7", password="s3cret",
                          reconnect_delay=(0.1, 0.2))  # system trust store: our test CA is unknown
    with pytest.raises(BrokerUnreachable, match="TLS connection failed.*ca_certs"):
        conn.start(timeout=2)


@pytest.mark.integration
def test_a_login_the_broker_refuses_fails_at_once_naming_the_cause(secure_broker, fleet):
    conn = MqttConnection("dev-1", secure_broker.url, username="dev-1", password="wrong",
                          ca_certs=str(fleet.ca_cert), reconnect_delay=(0.1, 0.2))
    started = time.monotonic()
    with pytest.raises(BrokerRefused, match="refused the login of 'dev-1'.*not authorized"):
        conn.start(timeout=60)
    assert time.monotonic() - started < 30  # the first CONNACK decides, not the timeout


@pytest.mark.integration
def test_publishes_and_subscriptions_the_acl_refuses_are_logged_with_what_to_fix(
        secure_broker, fleet, caplog):
    password = (fleet.bundle("dev-2") / "password").read_text()
    # dev-2's login, but configured as dev-1: the broker's ACL refuses dev-1's topics.
    conn = MqttConnection("dev-1", secure_broker.url, username="dev-2", password=password,
                          ca_certs=str(fleet.ca_cert),
                          subscriptions=[("edgefl/demo/clients/dev-1/receipt", 1)])
    with caplog.at_level("ERROR", logger="edgefl.transport"), conn:
        assert not conn.publish("edgefl/demo/clients/dev-1/status", b"{}", qos=1, timeout=10)
        assert conn.publish("edgefl/demo/clients/dev-2/status", b"{}", qos=1, timeout=10)
    assert conn.refused_publishes == 1
    refused = [r.getMessage() for r in caplog.records if "refused the message" in r.getMessage()]
    assert len(refused) == 1 and "edgefl/demo/clients/dev-1/status" in refused[0]
    assert "Not authorized" in refused[0] and "ACL for user 'dev-2'" in refused[0]
