"""The Mosquitto launcher the demo and the test suite rely on."""
import socket

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefl_server.mosquitto import BrokerUnavailable, MosquittoBroker, find_mosquitto


def _retained_payload(broker, topic, timeout=5.0):
    got = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, msg: got.append(msg.payload)
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        import time
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        # DISCONNECT first: the network thread then ends at once, not after its 1-s select
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


def test_mosquitto_is_installed():
    assert find_mosquitto(), "mosquitto must be installed (make setup installs it)"


def test_broker_listens_on_loopback_and_keeps_retained_messages_across_restart(broker):
    with socket.create_connection((broker.host, broker.port), timeout=2):
        pass
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    publisher.publish("edgefl/t/model", b"v1", qos=1, retain=True).wait_for_publish(5)
    publisher.disconnect()
    publisher.loop_stop()

    broker.restart()
    assert _retained_payload(broker, "edgefl/t/model") == b"v1"


def test_a_port_in_use_is_a_clear_error(broker):
    with pytest.raises(BrokerUnavailable, match="already in use"):
        MosquittoBroker(broker.port).start(timeout=5)
