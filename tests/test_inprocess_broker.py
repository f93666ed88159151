"""The in-process MQTT v5 broker used when Mosquitto is not installed, driven by real paho clients."""
import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefl_server.inprocess_broker import InProcessBroker, topic_matches


@pytest.fixture
def inproc():
    with InProcessBroker() as b:
        yield b


class Peer:
    """A paho client that records what it receives."""

    def __init__(self, broker, client_id="", *, clean_start=True, expiry=0, will=None):
        self.messages = []
        self.got = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        if will:
            self.client.will_set(*will)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        self.client.connect(broker.host, broker.port, clean_start=clean_start, properties=props)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        with self.got:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self.got.notify_all()

    def subscribe(self, topic, qos=1):
        result, mid = self.client.subscribe(topic, qos=qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.1)

    def publish(self, topic, payload, qos=1, retain=False):
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def wait_for(self, count, timeout=5.0):
        with self.got:
            self.got.wait_for(lambda: len(self.messages) >= count, timeout)
        return self.messages

    def close(self, clean=True):
        if clean:
            self.client.disconnect()
        else:  # vanish without DISCONNECT, as a device losing power
            self.client.socket().close()
        self.client.loop_stop()


@pytest.mark.parametrize(
    "topic_filter, topic, expected",
    [
        ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
        ("a/#", "a/b/c", True), ("+/+/c", "x/y/c", True), ("#", "$SYS/x", False), ("a/b", "a/c", False),
        ("edgefl/f/clients/+/update", "edgefl/f/clients/dev-1/update", True),
    ],
)
def test_topic_matching(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


def test_qos1_publish_and_retained_messages(inproc):
    sub = Peer(inproc)
    sub.subscribe("edgefl/f/clients/+/update")
    pub = Peer(inproc)
    pub.publish("edgefl/f/clients/a/update", b"u1")
    pub.publish("edgefl/f/model", b"model-v1", retain=True)
    assert sub.wait_for(1) == [("edgefl/f/clients/a/update", b"u1", False)]
    late = Peer(inproc)
    late.subscribe("edgefl/f/model")
    assert late.wait_for(1) == [("edgefl/f/model", b"model-v1", True)]
    for p in (sub, pub, late):
        p.close()


def test_last_will_is_published_when_a_device_vanishes(inproc):
    watcher = Peer(inproc)
    watcher.subscribe("edgefl/f/clients/+/status")
    device = Peer(inproc, "dev-1", will=("edgefl/f/clients/dev-1/status", b"offline", 1, True))
    device.close(clean=False)
    assert watcher.wait_for(1)[0][:2] == ("edgefl/f/clients/dev-1/status", b"offline")
    watcher.close()


def test_persistent_session_receives_what_was_sent_while_away(inproc):
    device = Peer(inproc, "dev-2", clean_start=False, expiry=3600)
    device.subscribe("edgefl/f/clients/dev-2/receipt")
    device.close()
    server = Peer(inproc)
    server.publish("edgefl/f/clients/dev-2/receipt", b"accepted")
    server.close()
    back = Peer(inproc, "dev-2", clean_start=False, expiry=3600)
    assert back.wait_for(1) == [("edgefl/f/clients/dev-2/receipt", b"accepted", False)]
    back.close()


def test_shared_subscription_gives_each_message_to_one_member(inproc):
    a, b = Peer(inproc), Peer(inproc)
    for p in (a, b):
        p.subscribe("$share/agg/edgefl/f/clients/+/update")
    pub = Peer(inproc)
    for i in range(10):
        pub.publish(f"edgefl/f/clients/d{i}/update", b"x")
    deadline = time.monotonic() + 5
    while len(a.messages) + len(b.messages) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(a.messages) + len(b.messages) == 10
    assert a.messages and b.messages
    for p in (a, b, pub):
        p.close()


def test_oversized_packet_closes_only_the_sender(inproc):
    small = InProcessBroker(max_packet_size=1024).start()
    try:
        sub = Peer(small)
        sub.subscribe("t")
        pub = Peer(small)
        pub.client.publish("t", b"x" * 4096, qos=0)
        pub.client.publish("t", b"ok", qos=0)  # may or may not pass: the sender is disconnected
        other = Peer(small)
        other.publish("t", b"still up")
        assert ("t", b"still up", False) in sub.wait_for(1)
        assert all(len(p) < 4096 for _, p, _ in sub.messages)
        for p in (sub, other):
            p.close()
    finally:
        small.stop()


def test_mqtt_311_clients_are_refused_with_unsupported_protocol(inproc):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    codes = []
    client.on_connect = lambda c, u, f, rc, p=None: codes.append(rc)
    client.connect(inproc.host, inproc.port)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.02)
    client.loop_stop()
    assert codes and codes[0].is_failure


def test_garbage_bytes_do_not_take_the_broker_down(inproc):
    with socket.create_connection((inproc.host, inproc.port)) as raw:
        raw.sendall(b"\x10\xff\xff\xff\xff\x7f garbage")
    p = Peer(inproc)
    p.subscribe("t")
    p.publish("t", b"alive")
    assert p.wait_for(1)[0][1] == b"alive"
    p.close()


def test_a_whole_federation_runs_on_the_inprocess_broker(inproc, tmp_path):
    """The zero-install path: server and device processes with no Mosquitto in between."""
    import json
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "edgefl", "simulate", "--devices", "3", "--rounds", "3",
         "--broker", inproc.url, "--out", str(tmp_path), "--round-timeout", "30"],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_model_version"] == 3
    assert summary["devices_on_final_version"] == 3
    assert [r["accepted"] for r in summary["rounds"]] == [3, 3, 3]
    assert summary["predictions"]["errors"] == 0
