"""Ingestion workers over a real Mosquitto: the same round with 1, 2 or 3 ingestion processes,
a worker killed mid-round, bad input handled by the workers, and workers on a provisioned fleet
(own logins, sealed updates, signed receipts, a share group devices cannot join)."""
from __future__ import annotations

import os
import queue
import signal
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.transport.mqtt import BrokerUnreachable
from edgefl.trust import seal
from edgefl.trust.pinning import PinnedKeys
from edgefl.wire import Update, encode_update
from edgefl.wire.protocol import DeviceStatus, Receipt, Topics
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.provisioning import MAX_INGEST_WORKERS, reload_broker
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
                          ingest_workers=workers, insecure=True)
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


# -- on a provisioned fleet ------------------------------------------------------------------------

#: Devices that send updates on the provisioned fleet ``demo``.
PARTICIPANTS = tuple(f"dev-{i}" for i in range(8))
#: Devices the ``fleet`` fixture provisions for this module.
FLEET_DEVICES = PARTICIPANTS + ("spy-1", "spy-2")


class DeviceLogin:
    """One provisioned device as the broker sees it: its own TLS login, its status and update
    topics, its receipts (the frames as they arrive)."""

    def __init__(self, broker, fleet, name):
        self.name, self.receipts = name, queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(fleet.ca_cert))
        self.client.username_pw_set(name, (fleet.bundle(name) / "password").read_text())
        ready = self._subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(Topics("demo").receipt(name), 1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.receipts.put(bytes(m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert ready.wait(10), f"{name} could not log in"

    def publish(self, topic, payload, retain=False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def subscribe(self, topic):
        self._subscribed.clear()
        self.client.subscribe(topic, 1)
        assert self._subscribed.wait(10), f"no SUBACK for {topic}"

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def sealed_update_of(fleet, client, num_params):
    return seal(update_of(client, num_params), fleet.sealing_key().public_key(), fleet="demo",
                client_id=client, round_id=1)


def run_provisioned_round(broker, fleet, state_dir, workers, *, during=None):
    """One round of every device's sealed update through ``workers`` ingesting processes."""
    model = build_mlp(LAYERS, seed=3)
    n = model.manifest.num_params
    devices = [DeviceLogin(broker, fleet, d) for d in PARTICIPANTS]
    try:
        for device in devices:
            device.publish(Topics("demo").status(device.name), DeviceStatus("online").to_json(),
                           retain=True)
        config = ServerConfig(broker_url=broker.url, fleet="demo", state_dir=state_dir,
                              rounds=1, min_clients=len(PARTICIPANTS), round_timeout=120.0,
                              ingest_workers=workers, fleet_dir=fleet.directory)
        server = AggregationServer(config, initial_model=model).start(timeout=60)
        try:
            wait_until(lambda: server.round.phase == OPEN, what="the round to open")
            if during is not None:
                during(server)
            for device in devices:
                device.publish(Topics("demo").update(device.name),
                               sealed_update_of(fleet, device.name, n))
            assert server.wait(60), "the round did not close: an update went missing"
            receipts = {d.name: d.receipts.get(timeout=30) for d in devices}
            return server.model, server.history[-1], receipts
        finally:
            server.close()
    finally:
        for device in devices:
            device.close()


def test_workers_on_a_provisioned_fleet_open_sealed_updates_and_sign_receipts(
        secure_broker, fleet, tmp_path):
    one, one_result, _ = run_provisioned_round(secure_broker, fleet, tmp_path / "one", 1)
    model, result, receipts = run_provisioned_round(secure_broker, fleet, tmp_path / "two", 2)
    assert one_result.accepted == result.accepted == len(PARTICIPANTS)
    np.testing.assert_array_equal(model.weights, one.weights)  # bit for bit
    for name, frame in receipts.items():  # each device can check its receipt's signature
        keys = PinnedKeys.from_trust_file(fleet.bundle(name) / "trust.json", fleet="demo")
        message = keys.verify(frame, "receipt", subject=name)
        receipt = Receipt.from_json(message.payload)
        assert (receipt.status, receipt.round_id, receipt.update_id) == ("accepted", 1, 1)


def test_a_device_that_joins_the_share_group_by_the_server_id_takes_no_update(
        secure_broker, fleet, tmp_path):
    """Mosquitto's ACL file cannot refuse a subscription, and a share-group member that may not
    read a topic still takes its turn of the group's messages (the broker drops them): a device
    naming the workers' group could make them miss updates. The group is not the server id."""
    spies = []

    def join_the_group(server):
        for name, group in (("spy-1", "edgefl-server-demo"), ("spy-2", server.config.server_id)):
            spy = DeviceLogin(secure_broker, fleet, name)
            spy.subscribe(f"$share/{group}/edgefl/demo/clients/+/update")
            spies.append(spy)

    try:
        _, result, _ = run_provisioned_round(secure_broker, fleet, tmp_path / "spied", 2,
                                             during=join_the_group)
    finally:
        for spy in spies:
            spy.close()
    assert result.accepted == len(PARTICIPANTS)  # no update waited for a device's resend


def test_workers_of_a_fleet_directory_without_worker_logins_say_what_to_run(
        secure_broker, fleet, tmp_path):
    passwd = fleet.path("broker", "passwd")
    passwd.write_text("".join(line + "\n" for line in passwd.read_text().splitlines()
                              if ".w" not in line.split(":")[0]))
    assert reload_broker(fleet)
    time.sleep(0.5)  # Mosquitto re-reads its files when it handles the signal
    config = ServerConfig(broker_url=secure_broker.url, fleet="demo", state_dir=tmp_path / "s",
                          rounds=1, ingest_workers=2, fleet_dir=fleet.directory)
    server = AggregationServer(config, initial_model=build_mlp(LAYERS, seed=3))
    with pytest.raises(BrokerUnreachable, match="re-run `edgefl fleet init`"):
        server.start(timeout=30)


def test_a_provisioned_fleet_takes_at_most_its_worker_logins(fleet, tmp_path):
    with pytest.raises(ValueError, match=f"--ingest-workers {MAX_INGEST_WORKERS} or fewer"):
        ServerConfig(broker_url="mqtts://localhost:1", fleet="demo", state_dir=tmp_path,
                     ingest_workers=MAX_INGEST_WORKERS + 1, fleet_dir=fleet.directory)


def test_ctrl_c_leaves_the_workers_to_the_coordinator_and_sigterm_ends_one_cleanly(
        broker, devices_online, tmp_path):
    n = build_mlp(LAYERS, seed=3).manifest.num_params
    messages = [(TOPICS.update(d), update_of(d, n)) for d in DEVICES]
    reference, _, _ = run_round(broker, tmp_path / "ref", 1, messages, server_id="srv-sig-ref")
    codes = []

    def signal_the_workers(server, publish):
        first, second = server.workers._procs
        os.kill(first.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the whole group
        os.kill(second.pid, signal.SIGTERM)
        second.join(10)
        codes.append(second.exitcode)
        publish(messages)
        wait_until(lambda: server.workers.restarts >= 1, what="the worker's restart")
        codes.append(first.is_alive())

    model, result, _ = run_round(broker, tmp_path / "signals", 2, messages,
                                 server_id="srv-signals", during=signal_the_workers)
    assert codes == [0, True]  # SIGTERM: a clean exit; SIGINT: ignored
    assert (result.accepted, result.stragglers) == (len(DEVICES), ())
    np.testing.assert_array_equal(model.weights, reference.weights)
