"""Ingestion workers over a real Mosquitto: the same round with 1, 2 or 3 ingestion processes,
a worker killed mid-round, and bad input handled by the workers."""
from __future__ import annotations

import os
import queue
import signal
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.wire import Update, encode_update
from edgefl.wire.protocol import DeviceStatus, Receipt, Topics
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.rounds import OPEN

pytestmark = pytest.mark.integration

FLEET = "share"
TOPICS = Topics(FLEET)
DEVICES = [f"d{i:02d}" for i in range(24)]
LAYERS = (8, 16, 3)


def update_of(client: str, num_params: int, update_id: int = 1) -> bytes:
    """A sparse f16 update whose values depend on the client (sums differ by order otherwise)."""
    rng = np.random.default_rng(sum(map(ord, client)))
    k = num_params // 4
    indices = np.sort(rng.choice(num_params, k, replace=False)).astype(np.uint32)
    values = rng.normal(0, 0.1, k).astype(np.float16).astype(np.float32)
    return encode_update(Update(client, 1, 0, update_id, 5 + len(client) % 7, num_params,
                                indices, values, "f16"))


class Peer:
    """A raw paho client: publishes as devices do, collects what it subscribed to."""

    def __init__(self, broker, client_id, topics=()):
        self.got: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        ready = threading.Event()

        def on_connect(c, userdata, flags, reason_code, properties):
            if topics:
                c.subscribe([(t, 1) for t in topics])
            else:
                ready.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = lambda c, u, m: self.got.put((m.topic, bytes(m.payload)))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert ready.wait(10)

    def publish_all(self, messages, retain=False):
        infos = [self.client.publish(t, p, qos=1, retain=retain) for t, p in messages]
        for info in infos:
            info.wait_for_publish(30)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate, timeout=60.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def devices_online(broker):
    peer = Peer(broker, "statuses")
    peer.publish_all([(TOPICS.status(d), DeviceStatus("online").to_json()) for d in DEVICES],
                     retain=True)
    peer.close()
    return DEVICES


def run_round(broker, state_dir, workers, messages, *, server_id, during=None):
    """One round over ``messages`` (topic, payload); ``during(server, publish)`` may intervene."""
    model = build_mlp(LAYERS, seed=3)
    config = ServerConfig(broker_url=broker.url, fleet=FLEET, state_dir=state_dir, rounds=1,
                          min_clients=len(DEVICES), round_timeout=120.0, server_id=server_id,
                          ingest_workers=workers,
                          # workers run only insecure so far (docs/operations.md)
                          insecure=True)
    server = AggregationServer(config, initial_model=model).start(timeout=60)
    publisher = Peer(broker, f"{server_id}-devices")
    try:
        wait_until(lambda: server.round.phase == OPEN, what="the round to open")
        if during is None:
            publisher.publish_all(messages)
        else:
            during(server, publisher.publish_all)
        assert server.wait(120), "the round did not close"
        return server.model, server.history[-1], server
    finally:
        publisher.close()
        server.close()


def test_two_and_three_workers_give_the_same_round_as_one_process(broker, devices_online,
                                                                  tmp_path):
    n = build_mlp(LAYERS, seed=3).manifest.num_params
    messages = [(TOPICS.update(d), update_of(d, n)) for d in DEVICES]
    one, one_result, _ = run_round(broker, tmp_path / "one", 1, messages, server_id="srv-one")
    assert one.version == 1 and one_result.accepted == len(DEVICES)
    for workers in (2, 3):
        # another arrival order, split among the workers as the broker pleases
        model, result, _ = run_round(broker, tmp_path / f"w{workers}", workers, messages[::-1],
                                     server_id=f"srv-w{workers}")
        np.testing.assert_array_equal(model.weights, one.weights)  # bit for bit
        assert (result.accepted, result.stragglers, result.rejected) == (len(DEVICES), (), {})


def test_a_worker_killed_mid_round_loses_nothing_and_counts_nothing_twice(broker, devices_online,
                                                                         tmp_path):
    n = build_mlp(LAYERS, seed=3).manifest.num_params
    messages = [(TOPICS.update(d), update_of(d, n)) for d in DEVICES]
    reference, _, _ = run_round(broker, tmp_path / "ref", 1, messages, server_id="srv-ref")

    def kill_one_worker(server, publish):
        half = len(messages) // 2
        publish(messages[:half])
        victim = server.workers.pids()[0]
        os.kill(victim, signal.SIGKILL)
        publish(messages[half:])
        # duplicates of updates some worker may already have stored, as QoS 1 allows
        publish(messages[:4])
        wait_until(lambda: server.workers.restarts >= 1, what="the worker's restart")

    model, result, server = run_round(broker, tmp_path / "killed", 2, messages,
                                      server_id="srv-kill", during=kill_one_worker)
    assert (result.accepted, result.stragglers) == (len(DEVICES), ())
    np.testing.assert_array_equal(model.weights, reference.weights)
    assert "edgefl_server_ingest_worker_restarts_total 1" in server.metrics.render()


def test_workers_reject_bad_input_clearly_and_keep_the_round(broker, devices_online, tmp_path):
    n = build_mlp(LAYERS, seed=3).manifest.num_params
    messages = [(TOPICS.update(d), update_of(d, n)) for d in DEVICES]
    clean, _, _ = run_round(broker, tmp_path / "clean", 1, messages, server_id="srv-clean")
    watcher = Peer(broker, "watcher", [TOPICS.receipt("d00")])
    good = update_of("d00", n)
    corrupt = good[:-1] + bytes([good[-1] ^ 1])  # checksum broken
    impostor = update_of("d01", n, update_id=9)  # d01's update on d00's topic
    bad = [(TOPICS.update("d00"), corrupt), (TOPICS.update("d00"), impostor)]
    try:
        model, result, _ = run_round(broker, tmp_path / "dirty", 2, bad + messages,
                                     server_id="srv-dirty")
        receipts = []
        while len(receipts) < 2:
            topic, payload = watcher.got.get(timeout=30)
            receipts.append(Receipt.from_json(payload))
    finally:
        watcher.close()
    np.testing.assert_array_equal(model.weights, clean.weights)
    assert result.accepted == len(DEVICES)
    assert result.rejected == {"malformed": 1, "client_mismatch": 1}
    rejected = [r for r in receipts if r.status == "rejected"]
    assert len(rejected) == 1 and "claims client 'd01'" in rejected[0].reason
    assert any(r.status == "accepted" and r.update_id == 1 for r in receipts)
