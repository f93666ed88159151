"""The aggregation server against a real Mosquitto, with raw paho clients standing in for devices.

The broker runs a provisioned fleet's configuration (TLS, logins, ACL): each raw device logs in
with its own credentials and seals its updates to the server's key, the observer verifies the
server's signed models and announcements, devices verify their signed receipts. Updates are
built with :func:`edgefl.wire.encode_update`; the expected global model is computed here by hand
(sample-weighted mean of the deltas), so a run with bad input mixed in must produce exactly the
model of a run without it. Two tests of message flow control run on a plain broker (insecure).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.wire.protocol import (DeviceStatus, PrivacyConfig, Receipt, RoundAnnouncement, Topics,
                                  TrainingConfig)
from edgefl.simulation.datasets import dirichlet_partition, load_digits
from edgefl.trust import open_signed, seal
from edgefl.wire import Update, decode_model, encode_model, encode_update
from edgefl_server.accounting import CentralPrivacy, noise_multiplier_for, run_epsilon
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.local_dp import swamp_warning
from edgefl_server.model_builder import build_mlp
from edgefl_server.mosquitto import MosquittoBroker
from edgefl_server.store import StateError

pytestmark = pytest.mark.integration

FLEET = "demo"
TOPICS = Topics(FLEET)
DEVICES = ("d1", "d2", "d3")
FLEET_DEVICES = DEVICES + ("p1", "p2", "p3", "p4", "p5", "away")


def device_login(broker, name):
    """The EdgeClient arguments of device ``name``'s bundle."""
    bundle = broker.fleet.bundle(name)
    return dict(username=name, password=(bundle / "password").read_text(),
                ca_certs=str(bundle / "ca.crt"), trust=bundle / "trust.json")


@pytest.fixture
def broker(secure_broker):
    return secure_broker


@pytest.fixture
def plain_broker(tmp_path):
    """An anonymous broker for the tests of message flow control (the server runs insecure)."""
    with MosquittoBroker(persistence_dir=tmp_path / "plain-broker") as b:
        yield b
SAMPLES = {"d1": 10, "d2": 30, "d3": 60}


def delta_of(client: str, num_params: int) -> np.ndarray:
    return np.random.default_rng(sum(map(ord, client))).normal(0, 0.05, num_params).astype(np.float32)


def good_update(client, round_id, base_version, num_params, update_id=1) -> bytes:
    return encode_update(Update(client, round_id, base_version, update_id, SAMPLES[client],
                                num_params, None, delta_of(client, num_params)))


def expected_fedavg(weights, clients):
    total = sum(SAMPLES[c] * delta_of(c, weights.size).astype(np.float64) for c in clients)
    return (weights + total / sum(SAMPLES[c] for c in clients)).astype(np.float32)


class Paho:
    """A raw MQTT v5 client: a device (status, receipts) or an observer (round, model).

    On a provisioned broker it logs in as the device ``client_id`` (its bundle) or else as the
    fleet's observer, and unwraps the server's signed messages after verifying them.
    """

    def __init__(self, broker, client_id, topics=()):
        self.messages: dict[str, queue.Queue] = {}
        self.latest: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.fleet = broker.fleet
        username = client_id
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        if self.fleet is not None:
            if client_id in self.fleet.devices():
                password = (self.fleet.bundle(client_id) / "password").read_text()
            elif client_id == "server":  # the server's login, while no server runs
                creds = self.fleet.server_credentials()
                username, password = creds["username"], creds["password"]
            else:
                creds = self.fleet.observer_credentials()
                username, password = creds["username"], creds["password"]
            self.client.tls_set(ca_certs=str(self.fleet.ca_cert))
            self.client.username_pw_set(username, password)
            self.verify_key = self.fleet.signing_key().public_key()
        self.client.on_message = self._on_message
        self.subscribed = 0  # SUBACKs: one per connection, reconnections included
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: (
            topics and c.subscribe([(t, 1) for t in topics]), connected.set())
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(10)
        if topics:
            self.wait_subscribed(1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subscribed += 1
            self.cond.notify_all()

    def wait_subscribed(self, count, timeout=10.0):
        """Wait for the ``count``-th SUBACK (the first connection's is 1)."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.subscribed >= count, timeout), \
                f"{self.subscribed} SUBACK(s), not {count}"

    def _unwrap(self, topic, payload):
        if self.fleet is None or topic.endswith("/status"):  # devices do not sign status
            return payload
        kind = "receipt" if topic.endswith("/receipt") else topic.rsplit("/", 1)[1]
        subject = TOPICS.client_of(topic) if kind == "receipt" else ""
        return open_signed(payload, self.verify_key, fleet=FLEET, kind=kind,
                           subject=subject).payload

    def _on_message(self, client, userdata, msg):
        try:
            payload = self._unwrap(msg.topic, msg.payload)
            with self.cond:
                self.latest[msg.topic] = payload
                self.messages.setdefault(msg.topic, queue.Queue()).put(payload)
                self.cond.notify_all()
        except Exception:  # noqa: BLE001 - never raise into paho's network thread
            logging.exception("test client callback")

    def publish(self, topic, payload, retain=False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def next(self, topic, timeout=10.0) -> bytes:
        with self.cond:
            q = self.messages.setdefault(topic, queue.Queue())
        return q.get(timeout=timeout)

    def wait_for(self, topic, predicate, timeout=20.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                payload = self.latest.get(topic)
                if payload is not None:
                    value = predicate(payload)
                    if value:
                        return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting on {topic}; last: {payload!r:.200}")
                self.cond.wait(left)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class Device(Paho):
    def __init__(self, broker, client_id):
        super().__init__(broker, client_id, [TOPICS.receipt(client_id)])
        self.id = client_id
        self.publish(TOPICS.status(client_id), DeviceStatus("online").to_json(), retain=True)

    def send(self, payload, topic=None):
        """Publish an update, sealed as this device does (for the round the update names)."""
        if self.fleet is not None:
            round_id = int.from_bytes(payload[8:12], "little") if len(payload) >= 12 else 0
            payload = sealed(self.fleet, self.id, payload, round_id)
        self.publish(topic or TOPICS.update(self.id), payload)

    def receipt(self, timeout=10.0) -> Receipt:
        return Receipt.from_json(self.next(TOPICS.receipt(self.id), timeout))


def sealed(fleet, client_id, payload, round_id):
    return seal(payload, fleet.sealing_key().public_key(), fleet=FLEET, client_id=client_id,
                round_id=round_id)


def announcement(state, round_id=None):
    def check(payload):
        ann = RoundAnnouncement.from_json(payload)
        return ann if ann.state == state and round_id in (None, ann.round_id) else None
    return check


def model_version(version):
    def check(payload):
        model = decode_model(payload)
        return model if model.version == version else None
    return check


@pytest.fixture
def clients(broker):
    observer = Paho(broker, "observer", [TOPICS.round, TOPICS.model])
    devices = {c: Device(broker, c) for c in DEVICES}
    yield observer, devices
    for c in [observer, *devices.values()]:
        c.close()


def server_config(broker, tmp_path, **kw):
    base = dict(broker_url=broker.url, fleet=FLEET, state_dir=tmp_path / "state", rounds=2,
                min_clients=3, round_timeout=30.0, metrics_port=0)
    if broker.fleet is None:
        base["insecure"] = True
    else:
        base["fleet_dir"] = broker.fleet.directory
    return ServerConfig(**{**base, **kw})


def test_two_full_rounds_then_finished(broker, clients, tmp_path):
    observer, devices = clients
    initial = build_mlp((64, 32, 10), seed=0)
    n = initial.manifest.num_params
    seen = []
    server = AggregationServer(server_config(broker, tmp_path), initial_model=initial,
                               evaluate=lambda m: {"weight_mean": float(m.weights.mean())},
                               on_round=seen.append)
    with server:
        weights = initial.weights
        for round_id in (1, 2):
            ann = observer.wait_for(TOPICS.round, announcement("open", round_id))
            assert ann.selected == DEVICES and ann.model_version == round_id - 1
            assert ann.deadline > time.time() + 20
            for c, dev in devices.items():
                dev.send(good_update(c, round_id, ann.model_version, n, update_id=round_id))
                r = dev.receipt()
                assert (r.status, r.round_id, r.update_id) == ("accepted", round_id, round_id)
            model = observer.wait_for(TOPICS.model, model_version(round_id))
            weights = expected_fedavg(weights, DEVICES)
            np.testing.assert_allclose(model.weights, weights, rtol=1e-6, atol=1e-7)
            assert model.onnx == initial.onnx and model.sha256_matches
        final = observer.wait_for(TOPICS.round, announcement("finished"))
        assert final.model_version == 2
        assert server.wait(10)
    assert [(r.round_id, r.model_version, r.accepted, r.rejected) for r in seen] == [
        (1, 1, 3, {}), (2, 2, 3, {})]
    assert seen[1].close_reason == "every selected device answered"
    assert seen[0].uplink_bytes == 3 * (len(good_update("d1", 1, 0, n)) + 80 + len(FLEET) + 2)
    assert seen[0].downlink_bytes > 0 and seen[0].aggregation_seconds > 0
    assert seen[1].metrics == {"weight_mean": pytest.approx(float(weights.mean()))}
    # started again on the same state with more rounds: the run continues at round 3
    more = AggregationServer(server_config(broker, tmp_path, rounds=3, metrics_port=None))
    with more:
        ann = observer.wait_for(TOPICS.round, announcement("open", 3))
        assert ann.model_version == 2 and more.model.version == 2
        assert [r.round_id for r in more.history] == [1, 2]
    # central DP cannot start on rounds that ran without it: its epsilon covers the whole run
    central = CentralPrivacy(sampling_rate=1.0, noise_multiplier=2.0)
    with pytest.raises(StateError, match=r"2 with privacy 'none', this start has privacy "
                                         r"'central'.*cannot change on resume.*--state-dir"):
        AggregationServer(server_config(broker, tmp_path, rounds=4, central_privacy=central,
                                        metrics_port=None)).start()
    from edgefl_server.store import ServerStore
    saved = ServerStore(tmp_path / "state", fleet=FLEET, strategy="fedavg").load()
    assert len(saved.history) == 2 and saved.round.round_id == 3  # refused before any change


def run_one_round(broker, tmp_path, clients, *, bad: bool):
    """One round with three good devices; with ``bad``, every kind of bad input first."""
    observer, devices = clients
    with observer.cond:
        observer.latest.clear()  # forget the retained messages of an earlier run
    initial = build_mlp((64, 32, 10), seed=0)
    n = initial.manifest.num_params
    server = AggregationServer(server_config(broker, tmp_path, rounds=1, max_update_bytes=64 << 10),
                               initial_model=initial)
    with server:
        observer.wait_for(TOPICS.round, announcement("open", 1))
        d1 = devices["d1"]
        good = good_update("d1", 1, 0, n)
        if bad:
            body = bytearray(good[:-8])
            body[4] = 9  # wire format version 9
            wrong_format = bytes(body) + hashlib.sha256(bytes(body)).digest()[:8]
            body = bytearray(good[:-8])
            body[-4:] = np.array([np.nan], "<f4").tobytes()
            nan = bytes(body) + hashlib.sha256(bytes(body)).digest()[:8]
            body = bytearray(encode_update(Update("d1", 1, 0, 7, 5, n + 10, np.array([3, n + 4], np.uint32),
                                                  np.ones(2, np.float32)))[:-8])
            body[28:32] = np.array([n], "<u4").tobytes()  # header num_params (docs/wire-format.md)
            out_of_range = bytes(body) + hashlib.sha256(bytes(body)).digest()[:8]
            dropped = {"truncated": good[: len(good) // 2], "wrong format version": wrong_format,
                       "nan": nan, "indices out of range": out_of_range,
                       "oversized": b"\0" * (65 << 10)}
            for payload in dropped.values():
                d1.send(payload)
            # a payload claiming d2's id on d1's topic; a stale round; the wrong model version
            d1.send(good_update("d2", 1, 0, n, update_id=5))
            assert d1.receipt().reason.startswith("the update claims client 'd2'")
            d1.send(good_update("d1", 0, 0, n, update_id=6))
            assert "stale round 0" in d1.receipt().reason
            d1.send(good_update("d1", 1, 3, n, update_id=8))
            assert "model version 3" in d1.receipt().reason
            # the server is still up and counted every drop
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            assert 'edgefl_server_updates_rejected_total{reason="malformed"} 4' in text
            assert 'edgefl_server_updates_rejected_total{reason="oversized"} 1' in text
        d1.send(good)
        assert d1.receipt().status == "accepted"
        if bad:
            d1.send(good)  # a QoS 1 duplicate: the same receipt, counted once
            assert d1.receipt() == Receipt(1, 1, "accepted")
        for c in ("d2", "d3"):
            devices[c].send(good_update(c, 1, 0, n))
            assert devices[c].receipt().status == "accepted"
        model = observer.wait_for(TOPICS.model, model_version(1))
        assert server.wait(10)
        result = server.history[-1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                      timeout=5).read().decode()
    assert "edgefl_server_rounds_total 1" in text
    assert result.accepted == 3
    return model, result


def test_bad_input_changes_nothing(broker, clients, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="edgefl_server")
    clean, clean_result = run_one_round(broker, tmp_path / "clean", clients, bad=False)
    dirty, dirty_result = run_one_round(broker, tmp_path / "dirty", clients, bad=True)
    np.testing.assert_array_equal(dirty.weights, clean.weights)
    assert dirty.version == clean.version == 1
    assert clean_result.rejected == {}
    assert dirty_result.rejected == {"malformed": 4, "oversized": 1, "client_mismatch": 1,
                                     "stale_round": 1, "wrong_model_version": 1}
    dropped_lines = [r.getMessage() for r in caplog.records if "dropped an update" in r.getMessage()]
    assert len(dropped_lines) == 5, dropped_lines
    for words in ("format version 9", "is not finite", "checksum", "out of range", "65536"):
        assert any(words in line for line in dropped_lines), (words, dropped_lines)


def test_sigkill_mid_round_then_restart(broker, clients, tmp_path):
    """Two updates stored, server killed, one sent while it is down, one resent: all counted once."""
    observer, devices = clients
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "edgefl", "server", "--broker", broker.url, "--fleet", FLEET,
           "--fleet-dir", str(broker.fleet.directory),
           "--state-dir", str(state), "--rounds", "1", "--min-clients", "3",
           "--round-timeout", "60", "--model", "mlp:64-32-10", "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(cmd, env=env)
    try:
        observer.wait_for(TOPICS.round, announcement("open", 1), timeout=60)
        initial = observer.wait_for(TOPICS.model, model_version(0))
        n = initial.manifest.num_params
        for c in ("d1", "d2"):
            devices[c].send(good_update(c, 1, 0, n))
            assert devices[c].receipt().status == "accepted"
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        # while the server is down: d3 sends (queued in the server's session), d1 resends
        devices["d3"].send(good_update("d3", 1, 0, n))
        devices["d1"].send(good_update("d1", 1, 0, n))
        server = subprocess.Popen(cmd, env=env)
        model = observer.wait_for(TOPICS.model, model_version(1), timeout=60)
        observer.wait_for(TOPICS.round, announcement("finished"), timeout=30)
        assert server.wait(30) == 0
        np.testing.assert_allclose(model.weights, expected_fedavg(initial.weights, DEVICES),
                                   rtol=1e-6, atol=1e-7)
        assert devices["d3"].receipt().status == "accepted"
        assert devices["d1"].receipt() == Receipt(1, 1, "accepted")  # the resend: same receipt
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    from edgefl_server.store import ServerStore
    saved = ServerStore(state, fleet=FLEET, strategy="fedavg").load()
    assert saved.model.version == 1 and saved.history[0]["accepted"] == 3


def test_more_devices_than_the_broker_in_flight_window(plain_broker, tmp_path):
    """25 retained statuses and 25 updates: more QoS 1 messages than Mosquitto keeps in flight
    to one client (20), so every message the server handles must be acknowledged, status too."""
    broker = plain_broker
    names = [f"m{i:02d}" for i in range(25)]
    pub = Paho(broker, "many-publisher", [TOPICS.model])
    try:
        for name in names:
            pub.publish(TOPICS.status(name), DeviceStatus("online").to_json(), retain=True)
        initial = build_mlp((8, 4, 3), seed=0)
        n = initial.manifest.num_params
        config = server_config(broker, tmp_path, rounds=1, min_clients=25, metrics_port=None)
        with AggregationServer(config, initial_model=initial) as server:
            pub.wait_for(TOPICS.model, model_version(0))
            deadline = time.monotonic() + 20
            while server.round.phase != "open":
                assert time.monotonic() < deadline, "the round never opened"
                time.sleep(0.02)
            for name in names:
                pub.publish(TOPICS.update(name), encode_update(Update(
                    name, 1, 0, 1, 1, n, None, np.full(n, 0.01, np.float32))))
            assert server.wait(20)
        assert server.history[0].accepted == 25
        np.testing.assert_allclose(server.model.weights, initial.weights + np.float32(0.01), rtol=1e-6)
    finally:
        pub.close()


def test_deadline_extension_stragglers_and_late_updates(broker, clients, tmp_path):
    """Only d1 answers: no quorum at the deadline, one extension, then d1's update alone is
    aggregated; d2 is a straggler and its late update gets a receipt saying so."""
    observer, devices = clients
    initial = build_mlp((8, 4, 3), seed=0)
    n = initial.manifest.num_params
    seen = []
    # d1's update may arrive after the first deadline (the round is extended then anyway), but
    # not after the second: 4 s are generous for that on a loaded machine.
    config = server_config(broker, tmp_path, rounds=2, round_timeout=2.0, quorum=2,
                           strategy="fedprox", strategy_options={"proximal_mu": 0.25})
    with AggregationServer(config, initial_model=initial, on_round=seen.append):
        ann = observer.wait_for(TOPICS.round, announcement("open", 1))
        assert ann.config.mu == 0.25  # FedProx announces its proximal term
        devices["d1"].send(good_update("d1", 1, 0, n))
        assert devices["d1"].receipt().status == "accepted"
        def later_deadline(payload):
            a = RoundAnnouncement.from_json(payload)
            return a if a.state == "open" and a.deadline > ann.deadline else None

        assert observer.wait_for(TOPICS.round, later_deadline).round_id == 1
        model = observer.wait_for(TOPICS.model, model_version(1))
        np.testing.assert_allclose(model.weights, expected_fedavg(initial.weights, ["d1"]), rtol=1e-6)
        devices["d2"].send(good_update("d2", 1, 0, n))
        late = devices["d2"].receipt()
        assert late.status == "rejected" and "round 1 closed before this update arrived" in late.reason
        # round 2: nobody answers; after the extension the model is kept (version stays 1)
        final = observer.wait_for(TOPICS.round, announcement("finished"), timeout=60)
        assert final.model_version == 1
    assert seen[0].stragglers == ("d2", "d3") and seen[0].accepted == 1
    assert seen[0].close_reason.startswith("extended deadline reached without quorum")
    assert (seen[1].accepted, seen[1].model_version) == (0, 1)


def test_broker_restart_mid_round(broker, clients, tmp_path):
    """The broker goes down after one update was accepted: the server reconnects, renews its
    subscriptions, and the round completes with every update counted once."""
    observer, devices = clients
    initial = build_mlp((8, 4, 3), seed=0)
    n = initial.manifest.num_params
    with AggregationServer(server_config(broker, tmp_path, rounds=1, metrics_port=None),
                           initial_model=initial) as server:
        observer.wait_for(TOPICS.round, announcement("open", 1))
        devices["d1"].send(good_update("d1", 1, 0, n))
        assert devices["d1"].receipt().status == "accepted"
        broker.restart(downtime=0.5)
        deadline = time.monotonic() + 30
        while not (server.connected and all(
                d.client.is_connected() for d in devices.values())):
            assert time.monotonic() < deadline, "clients did not reconnect"
            time.sleep(0.05)
        for d in devices.values():  # the raw clients resubscribe in on_connect
            d.wait_subscribed(2)
        for c in ("d2", "d3"):
            devices[c].send(good_update(c, 1, 0, n))
            assert devices[c].receipt().status == "accepted"
        assert server.wait(20)
    np.testing.assert_allclose(server.model.weights, expected_fedavg(initial.weights, DEVICES),
                               rtol=1e-6)
    assert server.history[0].accepted == 3


def test_hostile_status_messages_do_not_stall_the_server(plain_broker, tmp_path):
    """Retained statuses that break the JSON parser (deep nesting) are still acknowledged: more
    of them than the broker keeps in flight must not stop updates from reaching the server."""
    broker = plain_broker
    pub = Paho(broker, "hostile", [TOPICS.model])
    names = [f"h{i:02d}" for i in range(25)]
    try:
        for name in names:
            pub.publish(TOPICS.status(name), b"[" * 100_000, retain=True)
        pub.publish(TOPICS.status("ok1"), DeviceStatus("online").to_json(), retain=True)
        initial = build_mlp((8, 4, 3), seed=0)
        n = initial.manifest.num_params
        config = server_config(broker, tmp_path, rounds=1, min_clients=1, metrics_port=None)
        with AggregationServer(config, initial_model=initial) as server:
            deadline = time.monotonic() + 20
            while server.round.phase != "open":
                assert time.monotonic() < deadline, "the round never opened"
                time.sleep(0.02)
            pub.publish(TOPICS.update("ok1"), encode_update(Update(
                "ok1", 1, 0, 1, 1, n, None, np.full(n, 0.01, np.float32))))
            assert server.wait(20)
        assert server.history[0].accepted == 1
    finally:
        for name in names:  # retained messages outlive the test otherwise
            pub.publish(TOPICS.status(name), b"", retain=True)
        pub.close()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point of the test
def test_an_aggregate_that_overflows_keeps_the_model(broker, clients, tmp_path):
    observer, devices = clients
    initial = build_mlp((8, 4, 3), seed=0)
    n = initial.manifest.num_params
    huge = np.full(n, 3.0e38, np.float32)  # finite, but twice of it is not
    # The server's default norm bound would clip these: this test is about the aggregate itself.
    with AggregationServer(server_config(broker, tmp_path, rounds=2, max_update_norm=None),
                           initial_model=initial) as server:
        for round_id, base in ((1, 0), (2, 1)):
            observer.wait_for(TOPICS.round, announcement("open", round_id))
            for c, device in devices.items():
                device.send(encode_update(Update(c, round_id, base, round_id, SAMPLES[c], n,
                                                 None, huge)))
                assert device.receipt().status == "accepted"
        assert server.wait(20)
    assert [r.model_version for r in server.history] == [1, 1]  # round 2 kept version 1
    assert np.isfinite(server.model.weights).all()


def test_a_failing_store_is_retried_and_loses_nothing(broker, clients, tmp_path, monkeypatch):
    """A store that fails (e.g. a full disk) leaves updates unacknowledged and retries them."""
    observer, devices = clients
    initial = build_mlp((8, 4, 3), seed=0)
    n = initial.manifest.num_params
    server = AggregationServer(server_config(broker, tmp_path, rounds=1), initial_model=initial)
    with server:
        observer.wait_for(TOPICS.round, announcement("open", 1))
        ingestor = server._ingestor
        real = ingestor.ingest_batch
        failures = []

        def failing_twice(*args, **kwargs):
            if len(failures) < 2:
                failures.append(1)
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)

        monkeypatch.setattr(ingestor, "ingest_batch", failing_twice)
        for c, device in devices.items():
            device.send(good_update(c, 1, 0, n))
        for device in devices.values():
            assert device.receipt(timeout=20).status == "accepted"
        assert server.wait(20)
    assert len(failures) == 2
    assert server.history[0].accepted == 3
    np.testing.assert_allclose(server.model.weights, expected_fedavg(initial.weights, DEVICES),
                               rtol=1e-5, atol=1e-6)


def test_a_poisoned_minority_moves_fedavg_but_not_the_robust_rules(broker, tmp_path, caplog):
    """5 devices over Mosquitto, one poisoned (its honest delta x -10), random-k 25% from the
    round's shared seed: FedAvg's step turns against the honest direction, the robust rules'
    steps stay with it."""
    from edgefl import kernels
    from edgefl.wire.protocol import CompressionConfig, TrainingConfig

    ids = ("p1", "p2", "p3", "p4", "p5")
    observer = Paho(broker, "observer", [TOPICS.round, TOPICS.model])
    devices = {c: Device(broker, c) for c in ids}
    initial = build_mlp((64, 32, 10), seed=0)
    n = initial.manifest.num_params
    honest = np.random.default_rng(7).normal(0.02, 0.005, n).astype(np.float32)
    training = TrainingConfig(compression=CompressionConfig("randomk", density=0.25))
    steps = {}
    try:
        for name, options in (("fedavg", {}), ("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.2}),
                              ("krum", {"num_malicious_clients": 1})):
            with observer.cond:
                observer.latest.clear()
            config = server_config(broker, tmp_path / name, rounds=1, min_clients=5,
                                   strategy=name, strategy_options=options, training=training)
            with AggregationServer(config, initial_model=initial) as server:
                ann = observer.wait_for(TOPICS.round, announcement("open", 1))
                idx = kernels.randomk(n, int(np.ceil(0.25 * n)), ann.randomk_seed)
                for i, (c, dev) in enumerate(devices.items()):
                    noise = np.random.default_rng(i).normal(0, 0.002, idx.size).astype(np.float32)
                    values = honest[idx] + noise
                    if c == "p5":
                        values = -10.0 * values
                    dev.send(encode_update(Update(c, 1, 0, 1, 10, n, idx, values)))
                    assert dev.receipt().status == "accepted"
                model = observer.wait_for(TOPICS.model, model_version(1))
                assert server.wait(10)
            steps[name] = (model.weights - initial.weights)[idx]
    finally:
        for c in [observer, *devices.values()]:
            c.close()
    assert np.mean(steps["fedavg"] < 0) > 0.95  # dragged against the honest direction
    for name in ("fedmedian", "fedtrimmedavg", "krum"):
        assert np.mean(steps[name] > 0.01) > 0.95, name  # stays with the honest majority
    # the pairing that weakens the rules is named when the server starts
    caplog.set_level(logging.WARNING, logger="edgefl_server")
    AggregationServer(server_config(broker, tmp_path / "warned", strategy="fedmedian",
                                    training=TrainingConfig(compression=CompressionConfig(
                                        "topk", density=0.1))))
    assert any("fedmedian with topk" in r.getMessage() and "randomk" in r.getMessage()
               for r in caplog.records)


def test_a_device_without_samples_is_not_selected(broker, clients, tmp_path):
    """A device none of whose samples fit the model says so (samples: 0): a round waiting for
    it could only wait out its deadline."""
    observer, devices = clients
    empty = DEVICES[0]
    devices[empty].publish(TOPICS.status(empty),
                           DeviceStatus("online", {"samples": 0}).to_json(), retain=True)
    config = server_config(broker, tmp_path, rounds=1, min_clients=2)
    with AggregationServer(config, initial_model=build_mlp((8, 4, 3), seed=0)):
        ann = observer.wait_for(TOPICS.round, announcement("open", 1))
        assert sorted(ann.selected) == sorted(DEVICES[1:])


def wait_for_counter(client, name, value, timeout=20.0):
    deadline = time.monotonic() + timeout
    while client.counters[name] != value and time.monotonic() < deadline:
        time.sleep(0.02)
    return client.counters[name] == value


@pytest.mark.parametrize("session_kept", [True, False])
def test_compressed_refreshes_and_a_device_that_missed_versions(broker, clients, tmp_path,
                                                                session_kept):
    """The server publishes each version as a refresh (top-5% f16 with error feedback) and as
    the retained envelope. A device away for three versions catches up on its return, through
    the refreshes its session kept or the full envelope, to the server's weights bit for bit."""
    from edgefl.device.client import EdgeClient
    from edgefl.wire import decode_refresh
    from edgefl_server.downlink import DownlinkConfig

    observer, devices = clients
    # One observer login at a time: the broker makes the user name the client id.
    observer.client.subscribe(TOPICS.refresh, 1)
    refreshes = observer
    initial = build_mlp((64, 32, 10), seed=0)
    n = initial.manifest.num_params
    expiry = 3600 if session_kept else 0
    # "away" holds version 0 from an earlier run and was last online before the server started
    from edgefl.device.saved_model import SavedModel
    (tmp_path / "away").mkdir()
    from edgefl.trust import Signer
    SavedModel(tmp_path / "away").save_full(  # saved as devices save it: signed
        Signer(broker.fleet.signing_key(), FLEET).sign("model", encode_model(initial)))
    status = Paho(broker, "server", [TOPICS.status("away")])

    def state(expected):
        return lambda payload: DeviceStatus.from_json(payload).state == expected

    with EdgeClient("away", FLEET, broker.url, tmp_path / "away", reconnect_delay=(0.1, 0.5),
                    session_expiry=expiry, **device_login(broker, "away")) as away:
        assert away.model_version == 0
        status.wait_for(TOPICS.status("away"), state("online"))
    status.wait_for(TOPICS.status("away"), state("offline"))
    status.close()
    config = server_config(broker, tmp_path, rounds=3, min_clients=3,
                           downlink=DownlinkConfig(density=0.05, values="f16"))
    with AggregationServer(config, initial_model=initial) as server:
        # three rounds of the other three devices while "away" is offline
        rebuilt = initial.weights
        for round_id in (1, 2, 3):
            ann = observer.wait_for(TOPICS.round, announcement("open", round_id))
            assert "away" not in ann.selected
            for c, dev in devices.items():
                dev.send(good_update(c, round_id, ann.model_version, n, update_id=round_id))
                assert dev.receipt().status == "accepted"
            refresh = decode_refresh(refreshes.next(TOPICS.refresh, timeout=20))
            assert (refresh.base_version, refresh.version) == (round_id - 1, round_id)
            assert refresh.k == int(np.ceil(0.05 * n))
            rebuilt = refresh.apply(rebuilt)  # checks the hash
            full = observer.wait_for(TOPICS.model, model_version(round_id))
            assert full.weights.tobytes() == rebuilt.tobytes()  # the envelope = the refreshes
        assert server.wait(20)
        final = server.model
    assert final.weights.tobytes() == rebuilt.tobytes()
    # the device comes back after the run
    back = EdgeClient("away", FLEET, broker.url, tmp_path / "away",
                      reconnect_delay=(0.1, 0.5), session_expiry=expiry,
                      **device_login(broker, "away"))
    with back:
        assert back.finished.wait(20)
        assert back.model_version == 3
        assert back.predictor.model.weights.tobytes() == final.weights.tobytes()
        assert wait_for_counter(back, "refreshes_applied", 3 if session_kept else 0)
        assert back.counters["refresh_fallbacks"] == (0 if session_kept else 1)
    # the residual survives a restart: a resumed server holds the same state
    from edgefl_server.store import ServerStore
    saved = ServerStore(tmp_path / "state", fleet=FLEET, strategy="fedavg").load()
    assert saved.downlink_state["residual"].shape == (n,)
    assert np.abs(saved.downlink_state["residual"]).max() > 0


def test_fedbuff_aggregates_every_k_updates_by_staleness_and_refuses_too_stale(broker, clients,
                                                                               tmp_path):
    """Buffered asynchronous mode (K = 2, S = 1) over Mosquitto: any device may send, every 2
    accepted updates make a version, an update one version old counts 1/sqrt(2), one two
    versions old gets a receipt saying it is too stale."""
    from edgefl_server.buffer import BufferConfig

    observer, devices = clients
    initial = build_mlp((64, 32, 10), seed=0)
    n = initial.manifest.num_params
    config = server_config(broker, tmp_path, rounds=3, min_clients=1,
                           buffer=BufferConfig(buffer_size=2, max_staleness=1))
    with AggregationServer(config, initial_model=initial) as server:
        ann = observer.wait_for(TOPICS.round, announcement("open", 1))
        assert ann.selected is None and ann.model_version == 0  # every device, no selection
        assert ann.max_staleness == 1  # announced: devices keep updates that still count
        for c in ("d1", "d2"):
            devices[c].send(good_update(c, 1, 0, n))
            assert devices[c].receipt().status == "accepted"
        v1 = observer.wait_for(TOPICS.model, model_version(1))
        np.testing.assert_allclose(v1.weights, expected_fedavg(initial.weights, ("d1", "d2")),
                                   rtol=1e-6, atol=1e-7)
        observer.wait_for(TOPICS.round, announcement("open", 2))
        # d3 still on version 0 (staleness 1), d1 on version 1
        devices["d3"].send(good_update("d3", 1, 0, n, update_id=3))
        assert devices["d3"].receipt().status == "accepted"
        devices["d1"].send(good_update("d1", 2, 1, n, update_id=2))
        assert devices["d1"].receipt().status == "accepted"
        v2 = observer.wait_for(TOPICS.model, model_version(2))
        d1, d3 = delta_of("d1", n).astype(np.float64), delta_of("d3", n).astype(np.float64)
        step = (SAMPLES["d1"] * d1 + SAMPLES["d3"] * d3 / np.sqrt(2)) / (SAMPLES["d1"] + SAMPLES["d3"])
        np.testing.assert_allclose(v2.weights, (v1.weights + step).astype(np.float32),
                                   rtol=1e-5, atol=1e-6)
        # d2 comes back with an update trained on version 0: two versions behind by now
        observer.wait_for(TOPICS.round, announcement("open", 3))
        devices["d2"].send(good_update("d2", 3, 0, n, update_id=9))
        receipt = devices["d2"].receipt()
        assert receipt.status == "rejected" and receipt.reason.startswith("too stale")
        assert "2 versions behind" in receipt.reason
    assert [r.accepted for r in server.history] == [2, 2]


def test_fedbuff_server_killed_mid_buffer_resumes_without_losing_or_double_counting(
        broker, clients, tmp_path):
    """K = 3: two updates buffered, the server killed; one sent while it is down, one resent
    (a duplicate): the restarted server counts exactly the three."""
    observer, devices = clients
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "edgefl", "server", "--broker", broker.url, "--fleet", FLEET,
           "--fleet-dir", str(broker.fleet.directory),
           "--state-dir", str(state), "--rounds", "1", "--min-clients", "1",
           "--buffer-size", "3", "--max-staleness", "2", "--model", "mlp:64-32-10",
           "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(cmd, env=env)
    try:
        observer.wait_for(TOPICS.round, announcement("open", 1), timeout=60)
        initial = observer.wait_for(TOPICS.model, model_version(0))
        n = initial.manifest.num_params
        for c in ("d1", "d2"):
            devices[c].send(good_update(c, 1, 0, n))
            assert devices[c].receipt().status == "accepted"
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        devices["d3"].send(good_update("d3", 1, 0, n))
        devices["d1"].send(good_update("d1", 1, 0, n))  # resent: already counted in the buffer
        server = subprocess.Popen(cmd, env=env)
        model = observer.wait_for(TOPICS.model, model_version(1), timeout=60)
        observer.wait_for(TOPICS.round, announcement("finished"), timeout=30)
        assert server.wait(30) == 0
        np.testing.assert_allclose(model.weights, expected_fedavg(initial.weights, DEVICES),
                                   rtol=1e-6, atol=1e-7)
        assert devices["d3"].receipt().status == "accepted"
        assert devices["d1"].receipt() == Receipt(1, 1, "accepted")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    from edgefl_server.store import ServerStore
    saved = ServerStore(state, fleet=FLEET, strategy="fedavg").load()
    assert saved.model.version == 1 and saved.history[0]["accepted"] == 3


def test_fedbuff_announces_the_staleness_bound_it_applies_after_a_restart(broker, clients,
                                                                          tmp_path):
    """The bound is announced with each round; a server resumed with another --max-staleness
    announces the one its ingestion now applies, not the one stored with the round."""
    from edgefl_server.buffer import BufferConfig

    observer, _ = clients
    initial = build_mlp((64, 32, 10), seed=0)
    for bound in (1, 3):
        config = server_config(broker, tmp_path, rounds=2, min_clients=1,
                               buffer=BufferConfig(buffer_size=2, max_staleness=bound))
        with AggregationServer(config, initial_model=initial):
            observer.wait_for(TOPICS.round,
                              lambda p: RoundAnnouncement.from_json(p).max_staleness == bound)


def _open_round(server, round_id=1, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (server.round is not None and server.round.phase == "open"
               and server.round.round_id == round_id):
        assert time.monotonic() < deadline, f"round {round_id} did not open"
        time.sleep(0.05)


def _until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _away_device(broker, tmp_path):
    """The EdgeClient "away" on its own state directory, with a part of digits to train on.

    Its receipt timeout is an hour, so it resends only when it starts: what a test sees
    it send, it sent on purpose."""
    from edgefl.device.client import EdgeClient

    X, y, _, _ = load_digits(0)
    part = dirichlet_partition(y, 4, alpha=0.5, seed=0)[0]
    device = EdgeClient("away", FLEET, broker.url, tmp_path / "away", reconnect_delay=(0.1, 0.5),
                        receipt_timeout=3600.0, **device_login(broker, "away"))
    device.add_data(X[part], y[part])
    return device


@contextlib.contextmanager
def _fedbuff_with_a_lost_update(fleet, tmp_path, buffer, rounds):
    """A FedBuff server on round 1 (version 0), and the device "away" with its update of round
    1 in its outbox, never receipted and never counted: the server was stopped, so the update
    waited in the server's session on the broker, which acknowledged it and crashed before
    saving it (nothing is saved between its start and the crash). Yields ``(broker, server,
    device, update id)`` once the restarted server is back on round 1 without the update."""
    initial = build_mlp((64, 32, 10), seed=0)

    def server():
        config = server_config(broker, tmp_path, rounds=rounds, min_clients=1, buffer=buffer)
        return AggregationServer(config, initial_model=initial).start()

    with MosquittoBroker(fleet=fleet, autosave_interval=3600, any_port=True) as broker:
        opener = Device(broker, "d3")  # online, so that round 1 opens
        first = server()
        try:
            _open_round(first)
        finally:
            first.close()
            opener.close()
        device = _away_device(broker, tmp_path).start(timeout=30)
        restarted = None
        try:
            assert wait_for_counter(device, "updates_sent", 1), "the device sent no update"
            [entry] = device.outbox.entries()
            assert (entry.round_id, entry.base_version) == (1, 0)
            time.sleep(0.5)  # the broker's PUBACK
            broker.kill()
            broker.start()
            restarted = server()
            _open_round(restarted)
            assert _until(device.connected.is_set)
            yield broker, restarted, device, entry.update_id
        finally:
            device.stop()
            if restarted is not None:
                restarted.close()


def _counted(tmp_path, round_id, client):
    """The id of ``client``'s update of ``round_id`` that the server's store holds, or None."""
    from edgefl_server.store import ServerStore

    store = ServerStore(tmp_path / "state", fleet=FLEET, strategy="fedavg")
    try:
        return store.find_update(round_id, client)
    finally:
        store.close()


def test_fedbuff_an_update_in_flight_while_rounds_advance_is_kept_resent_and_counted_once(
        fleet, tmp_path):
    """K = 2, S = 1. The device's update of round 1 is lost on the way; d1 and d2 fill round 1's
    buffer, so round 2 (version 1) is announced while the update waits for its receipt. The
    server still accepts it (one version old), so the device keeps it rather than giving it up
    with the round; resent when the device reboots, it fills round 2's buffer with the
    device's own update of round 2, and counts once."""
    from edgefl_server.buffer import BufferConfig

    with _fedbuff_with_a_lost_update(fleet, tmp_path, BufferConfig(buffer_size=2, max_staleness=1),
                                     rounds=2) as (broker, server, device, lost):
        n = server.model.manifest.num_params
        for c in ("d1", "d2"):
            peer = Device(broker, c)
            peer.send(good_update(c, 1, 0, n))
            assert peer.receipt().status == "accepted"
            peer.close()
        # round 2 announced: the device trains it and its update is the first of round 2
        assert wait_for_counter(device, "accepted", 1)
        assert server.round.round_id == 2 and server.round.max_staleness == 1
        assert [(e.round_id, e.update_id) for e in device.outbox.entries()] == [(1, lost)], \
            "the announcement of round 2 dropped an update the server would still accept"
        device.stop()
        with _away_device(broker, tmp_path) as rebooted:
            assert server.wait(30), f"rounds done: {[r.round_id for r in server.history]}"
            assert _until(lambda: len(rebooted.outbox) == 0)
            assert rebooted.counters["accepted"] == 1 and rebooted.rejections == []
        assert [r.accepted for r in server.history] == [2, 2]
    assert _counted(tmp_path, 1, "away") == lost


def test_fedbuff_an_update_past_the_staleness_bound_is_dropped_and_says_why(fleet, tmp_path,
                                                                            caplog):
    """K = 1, S = 1: every accepted update makes a version. The lost update of round 1 (on
    version 0) is kept while round 2 announces version 1, and dropped with a log line saying
    why once round 3 announces version 2, which the server would refuse as too stale."""
    from edgefl_server.buffer import BufferConfig

    caplog.set_level("INFO", logger="edgefl.device.outbox")
    with _fedbuff_with_a_lost_update(fleet, tmp_path, BufferConfig(buffer_size=1, max_staleness=1),
                                     rounds=3) as (broker, server, device, lost):
        n = server.model.manifest.num_params
        peer = Device(broker, "d1")
        peer.send(good_update("d1", 1, 0, n))
        assert peer.receipt().status == "accepted"
        peer.close()
        # rounds 2 and 3 are the device's own: each of its updates makes the next version
        assert server.wait(30), f"rounds done: {[r.round_id for r in server.history]}"
        assert _until(lambda: len(device.outbox) == 0)
        assert device.counters["accepted"] == 2
    assert [r.accepted for r in server.history] == [1, 1, 1]
    assert (f"dropped update {lost} of round 1 without a receipt: it was trained on model "
            "version 0, 2 versions behind the announced 2, and the server accepts at most 1"
            ) in caplog.text
    assert _counted(tmp_path, 1, "away") is None


# -- privacy -------------------------------------------------------------------------------------

def clipped(delta, clip):
    norm = np.linalg.norm(delta.astype(np.float64))
    return delta.astype(np.float64) * min(1.0, clip / norm)


def test_central_dp_noises_the_sum_reports_epsilon_and_stops_before_its_target(broker, clients,
                                                                              tmp_path):
    """q = 1, so every device is selected; the noise is seeded (a simulation's option) so the
    published model can be checked exactly: w + (sum of clipped deltas + noise) / (q N)."""
    observer, devices = clients
    initial = build_mlp((64, 32, 10), seed=0)
    n = initial.manifest.num_params
    z, clip, delta = 2.0, 0.5, 1e-5
    target = run_epsilon(z, 1.0, 2, delta) * 1.001  # two rounds fit, a third does not
    central = CentralPrivacy(sampling_rate=1.0, clip=clip, noise_multiplier=z,
                             target_epsilon=target, delta=delta)
    seen = []
    config = server_config(broker, tmp_path, rounds=10, central_privacy=central,
                           strategy_options={"noise_seed": 11})
    noise = np.random.default_rng(11)
    with AggregationServer(config, initial_model=initial, on_round=seen.append) as server:
        weights = initial.weights
        for round_id in (1, 2):
            ann = observer.wait_for(TOPICS.round, announcement("open", round_id))
            assert ann.config.privacy.mechanism == "central-gaussian"
            assert ann.config.privacy.clip == clip and ann.selected == DEVICES
            for c, dev in devices.items():
                dev.send(good_update(c, round_id, ann.model_version, n, update_id=round_id))
                assert dev.receipt().status == "accepted"
            model = observer.wait_for(TOPICS.model, model_version(round_id))
            total = sum(clipped(delta_of(c, n), clip) for c in DEVICES)
            total = total + noise.normal(0, z * clip, n)
            weights = (weights.astype(np.float64) + total / 3.0).astype(np.float32)
            np.testing.assert_allclose(model.weights, weights, rtol=1e-5, atol=1e-6)
        final = observer.wait_for(TOPICS.round, announcement("finished"))
        assert final.model_version == 2 and server.wait(10)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                         timeout=5).read().decode()
    assert [r.privacy["epsilon"] for r in seen] == [pytest.approx(run_epsilon(z, 1.0, k, delta))
                                                   for k in (1, 2)]
    assert seen[1].privacy["delta"] == delta and seen[1].privacy["rounds"] == 2
    assert "add/remove one device" in seen[1].privacy["adjacency"]
    assert seen[1].privacy["epsilon_if_selection_known"] >= seen[1].privacy["epsilon"]
    assert f"edgefl_server_privacy_epsilon {seen[1].privacy['epsilon']!r}" in metrics
    # resumed on the same state with more rounds: the target still refuses a third round
    again = AggregationServer(server_config(broker, tmp_path, rounds=12, central_privacy=central,
                                            metrics_port=None))
    with again:
        assert again.wait(10) and len(again.history) == 2
        assert again.privacy_report()["rounds"] == 2
        assert again.privacy_report()["epsilon"] == pytest.approx(run_epsilon(z, 1.0, 2, delta))
    # the recorded rounds ran at z = 2: another noise multiplier (or sampling rate) is refused,
    # saying which to resume with, and so is a start without central DP
    for changed in (dataclasses.replace(central, noise_multiplier=1.0),
                    dataclasses.replace(central, sampling_rate=0.5)):
        with pytest.raises(StateError, match=r"2 earlier round\(s\) used noise multiplier 2\.0 "
                                             r"and sampling rate 1\.0.*--sampling-rate 1\.0 "
                                             r"--noise-multiplier 2\.0"):
            AggregationServer(server_config(broker, tmp_path, rounds=12, central_privacy=changed,
                                            metrics_port=None)).start()
    with pytest.raises(StateError, match=r"2 with privacy 'central', this start has privacy "
                                         r"'none'"):
        AggregationServer(server_config(broker, tmp_path, rounds=12, metrics_port=None)).start()


def test_central_dp_calibrates_its_noise_for_the_target_and_the_rounds(tmp_path):
    central = CentralPrivacy(sampling_rate=0.1, clip=1.0, target_epsilon=4.0, delta=1e-5)
    server = AggregationServer(ServerConfig(broker_url="mqtt://127.0.0.1:1", fleet=FLEET,
                                            state_dir=tmp_path, rounds=50,
                                            central_privacy=central, insecure=True))
    z = server.strategy.options.noise_multiplier
    assert z == pytest.approx(noise_multiplier_for(4.0, 1e-5, 0.1, 50))
    assert run_epsilon(z, 0.1, 50, 1e-5) <= 4.0
    for bad, message in ((dict(strategy="fedadam"), "DP-FedAvg"),
                         (dict(clients_per_round=3), "Poisson"),
                         (dict(training=TrainingConfig(privacy=PrivacyConfig("laplace"))),
                          "cannot be combined")):
        with pytest.raises(ValueError, match=message):
            ServerConfig(broker_url="mqtt://127.0.0.1:1", fleet=FLEET, state_dir=tmp_path,
                         central_privacy=central, insecure=True, **bad)


def test_devices_that_cannot_take_part_are_not_selected_and_a_decline_is_not_waited_for(
        broker, clients, tmp_path):
    observer, devices = clients
    initial = build_mlp((64, 32, 10), seed=0)
    n = initial.manifest.num_params
    devices["d3"].publish(TOPICS.status("d3"), DeviceStatus("online", {
        "available": False, "unavailable": "privacy budget spent"}).to_json(), retain=True)
    devices["d2"].publish(TOPICS.status("d2"), DeviceStatus("online", {
        "mechanisms": ["none", "laplace"]}).to_json(), retain=True)
    seen = []
    config = server_config(broker, tmp_path, rounds=2, min_clients=1, round_timeout=60.0)
    with AggregationServer(config, initial_model=initial, on_round=seen.append):
        ann = observer.wait_for(TOPICS.round, announcement("open", 1))
        assert ann.selected == ("d1", "d2")  # d3 said it cannot take part
        # d2 declines round 1 and from now on takes part only in Laplace rounds
        devices["d2"].publish(TOPICS.status("d2"), DeviceStatus("online", {
            "mechanisms": ["laplace"], "declined": {"round_id": 1, "reason": "not today"}}).to_json(),
            retain=True)
        # Confirmed by the broker before d1 publishes, so the server's connection receives (and
        # its dispatcher handles) this status before d1's update.
        devices["d1"].send(good_update("d1", 1, 0, n))
        assert devices["d1"].receipt().status == "accepted"
        ann = observer.wait_for(TOPICS.round, announcement("open", 2))
        assert ann.selected == ("d1",)  # round 2 announces privacy "none", which d2 refuses
    assert seen[0].close_reason == "every selected device answered"  # not the 60 s deadline
    assert seen[0].stragglers == ("d2",)


def test_local_dp_that_cannot_learn_is_announced_with_a_warning(broker, clients, tmp_path, caplog):
    laplace = TrainingConfig(privacy=PrivacyConfig("laplace", epsilon=1.0, clip=1.0))
    config = server_config(broker, tmp_path, rounds=30, training=laplace, metrics_port=None)
    with caplog.at_level(logging.WARNING):
        with AggregationServer(config, initial_model=build_mlp((64, 32, 10), seed=0)):
            pass
    assert "so this run will not learn" in caplog.text and "--privacy central" in caplog.text
    assert swamp_warning(PrivacyConfig("laplace", epsilon=1.0, clip=1.0), 10, 10_000, 100) is None
