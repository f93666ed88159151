"""EdgeClient against a real Mosquitto, with raw paho clients playing the server's part.

The broker runs a provisioned fleet's configuration (TLS, logins, ACL). The raw peer logs in as
the server's principals, signs the retained models, round announcements and receipts it publishes
and opens the sealed updates, exactly as the protocol says, so each test controls the server
side precisely.
"""
import dataclasses
import json
import queue
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.device.client import EdgeClient, NoModelYet
from edgefl.simulation.datasets import dirichlet_partition, load_digits
from edgefl.wire.protocol import (
    CompressionConfig, DeviceStatus, PrivacyConfig, Receipt, RoundAnnouncement, Topics,
    TrainingConfig,
)
from edgefl.trust import Signer, open_sealed
from edgefl.wire import decode_update, encode_model
from edgefl_server.model_builder import build_mlp, dense_extractor

pytestmark = pytest.mark.integration

FLEET = "demo"
TOPICS = Topics(FLEET)
FLEET_DEVICES = ("dev-1", "dev-bad", "dev-a", "dev-b", "dev-empty")


@pytest.fixture
def broker(secure_broker):
    """Every test here runs against the provisioned broker."""
    return secure_broker


def login(fleet, username, password, client_id=None):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or username,
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(fleet.ca_cert))
    client.username_pw_set(username, password)
    return client


class FakeServer:
    """Raw paho peers with the server's logins: one sees updates and statuses and sends signed
    receipts, the other publishes signed models and rounds."""

    def __init__(self, broker):
        fleet = broker.fleet
        creds = fleet.server_credentials()
        self.signer = Signer(fleet.signing_key(), FLEET)
        self.sealing_key = fleet.sealing_key()
        self.updates: queue.Queue = queue.Queue()
        self.statuses: queue.Queue = queue.Queue()
        ready = queue.Queue()
        client = login(fleet, creds["username"], creds["password"])

        def on_connect(c, userdata, flags, reason_code, properties):
            c.subscribe([(TOPICS.all_updates, 1), (TOPICS.all_status, 1)])

        def on_message(c, userdata, msg):
            target = self.updates if msg.topic.endswith("/update") else self.statuses
            target.put((msg.topic, bytes(msg.payload)))

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: ready.put(True)
        client.on_message = on_message
        control = login(fleet, creds["control_username"], creds["password"])
        control_ready = queue.Queue()
        control.on_connect = lambda *a: control_ready.put(True)
        for c in (client, control):
            c.connect(broker.host, broker.port)
            c.loop_start()
        ready.get(timeout=5)
        control_ready.get(timeout=5)
        self.client, self.control = client, control

    def publish(self, topic, payload, retain=True):
        """Publish ``payload`` signed as the message kind of ``topic``."""
        if topic.endswith("/receipt"):
            signed = self.signer.sign("receipt", payload, subject=TOPICS.client_of(topic))
            via = self.client
        else:
            signed, via = self.signer.sign(topic.rsplit("/", 1)[1], payload), self.control
        via.publish(topic, signed, qos=1, retain=retain).wait_for_publish(5)

    def model(self, model):
        self.publish(TOPICS.model, encode_model(model))

    def round(self, round_id, model_version, *, state="open", selected=None, deadline=None,
              config=TrainingConfig(epochs=1, lr=0.1), seed=7, max_staleness=None):
        deadline = time.time() + 60 if deadline is None else deadline
        self.publish(TOPICS.round, RoundAnnouncement(
            round_id, model_version, deadline, config, selected, seed, state,
            max_staleness).to_json())

    def receipt(self, client_id, round_id, update_id, status="accepted", reason=""):
        self.publish(TOPICS.receipt(client_id), Receipt(round_id, update_id, status, reason).to_json(),
                     retain=False)

    def next_update(self, timeout=10):
        topic, payload = self.updates.get(timeout=timeout)
        _, plain = open_sealed(payload, self.sealing_key, fleet=FLEET,
                               client_id=TOPICS.client_of(topic))
        return topic, decode_update(plain)

    def status_of(self, client_id, timeout=5):
        while True:
            topic, payload = self.statuses.get(timeout=timeout)
            if topic == TOPICS.status(client_id):
                return DeviceStatus.from_json(payload)

    def close(self):
        for c in (self.client, self.control):
            c.disconnect()
            c.loop_stop()


@pytest.fixture
def server(broker):
    fake = FakeServer(broker)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def model0():
    return build_mlp((64, 32, 10), seed=0)


@pytest.fixture(scope="module")
def local_data():
    X, y, _, _ = load_digits(0)
    part = dirichlet_partition(y, 4, alpha=0.5, seed=0)[0]
    return X[part], y[part]


def next_version(model, version):
    rng = np.random.default_rng(version)
    weights = model.weights + rng.normal(0, 0.01, model.weights.size).astype(np.float32)
    return model.with_weights(weights, version=version, round_id=version)


def make_client(broker, tmp_path, local_data=None, name="dev-1", **kwargs):
    bundle = broker.fleet.bundle(name)
    client = EdgeClient(name, FLEET, broker.url, tmp_path / name, reconnect_delay=(0.1, 0.5),
                        username=name, password=(bundle / "password").read_text(),
                        ca_certs=str(bundle / "ca.crt"), trust=bundle / "trust.json", **kwargs)
    if local_data is not None:
        client.add_data(*local_data)
    return client


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def assert_sends_nothing_more(server, client, announcements, sent):
    """``client`` has decided on ``announcements`` round announcements, has no round left to
    handle, and has sent ``sent`` updates in all: nothing more is on its way (it counts an
    update as it hands it to paho, before the broker has it)."""
    def settled():
        with client._lock:
            return client.counters["announcements"] >= announcements and client._job is None \
                and not client.training.is_set()

    assert wait_for(settled), client.counters
    assert client.counters["updates_sent"] == sent, client.counters
    assert server.updates.empty()


# -- status and models ---------------------------------------------------------------------------

def test_status_online_with_capabilities_then_offline_on_stop(broker, server, tmp_path, local_data):
    client = make_client(broker, tmp_path, local_data).start(timeout=5)
    status = server.status_of("dev-1")
    assert status.state == "online"
    assert status.capabilities["samples"] == len(local_data[1])
    assert status.capabilities["kernels"] in ("cython", "numpy")
    client.stop()
    assert server.status_of("dev-1").state == "offline"


def test_predicts_after_the_retained_model_arrives(broker, server, tmp_path, model0, local_data):
    client = make_client(broker, tmp_path, local_data)
    with pytest.raises(NoModelYet, match="no global model yet"):
        client.predict(local_data[0][0])
    server.model(model0)  # retained before the device connects
    with client:
        assert wait_for(lambda: client.model_version == 0)
        probabilities = client.predict(local_data[0][:3])
        assert probabilities.shape == (3, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_graph_optimization_reaches_the_predictor_and_a_bad_one_fails_at_once(
        broker, server, tmp_path, model0, local_data):
    with pytest.raises(ValueError, match="graph_optimization must be one of"):
        make_client(broker, tmp_path, name="dev-bad", graph_optimization="fastest")
    client = make_client(broker, tmp_path, local_data, graph_optimization="all")
    server.model(model0)
    with client:
        assert wait_for(lambda: client.model_version == 0)
        predictor = client._predictor
        assert predictor._options.graph_optimization_level.name == "ORT_ENABLE_ALL"
        client.predict(local_data[0][:1])


def test_hot_swaps_newer_models_and_ignores_older_or_tampered_ones(broker, server, tmp_path, model0):
    with make_client(broker, tmp_path, model_refresh=False) as client:
        server.model(next_version(model0, 2))
        assert wait_for(lambda: client.model_version == 2)
        server.model(next_version(model0, 1))  # older: a device never goes back
        tampered = next_version(model0, 5)
        tampered = dataclasses.replace(tampered, onnx=tampered.onnx + b"\0")  # hash mismatch
        server.model(tampered)
        server.publish(TOPICS.model, b"not a model envelope")
        server.model(next_version(model0, 3))
        assert wait_for(lambda: client.model_version == 3)
        assert client.counters["models_refused"] == 2  # the tampered one and the garbage
        assert client.connected.is_set()


def test_a_rebooted_device_serves_its_saved_model_before_connecting(broker, server, tmp_path, model0,
                                                                     local_data):
    with make_client(broker, tmp_path) as client:
        server.model(next_version(model0, 4))
        assert wait_for(lambda: client.model_version == 4)
    rebooted = make_client(broker, tmp_path)  # not started: no broker contact yet
    assert rebooted.model_version == 4
    assert rebooted.predict(local_data[0][0]).shape == (10,)


# -- rounds --------------------------------------------------------------------------------------

def test_selected_device_trains_on_the_round_model_and_sends_one_update(broker, server, tmp_path,
                                                                        model0, local_data):
    server.model(model0)
    with make_client(broker, tmp_path, local_data) as client:
        server.round(1, 0, selected=["dev-1", "dev-9"])
        topic, update = server.next_update()
        assert topic == TOPICS.update("dev-1")
        assert (update.client_id, update.round_id, update.base_version) == ("dev-1", 1, 0)
        assert update.num_samples == len(local_data[1])
        assert update.indices is None and update.num_params == model0.manifest.num_params
        assert np.abs(update.values).max() > 0
        assert len(client.outbox) == 1  # kept until the receipt
        server.round(1, 0, selected=["dev-1", "dev-9"])  # the same announcement again
        assert_sends_nothing_more(server, client, announcements=2, sent=1)
        server.receipt("dev-1", 1, update.update_id)
        assert wait_for(lambda: len(client.outbox) == 0)
        assert client.counters["accepted"] == 1


def test_not_selected_closed_or_finished_rounds_send_nothing(broker, server, tmp_path, model0,
                                                             local_data):
    server.model(model0)
    with make_client(broker, tmp_path, local_data) as client:
        server.round(1, 0, selected=["dev-2"])
        server.round(2, 0, state="closed")
        assert_sends_nothing_more(server, client, announcements=2, sent=0)
        server.round(2, 0, state="finished")
        assert client.finished.wait(5)


def test_a_run_that_stops_before_the_round_it_announced_still_finishes(broker, server, tmp_path,
                                                                       model0, local_data):
    """Central DP's privacy target can end a run after round 3 was announced as coming: the
    "finished" announcement then names round 2, the last that ran, and still ends the run."""
    server.model(model0)
    with make_client(broker, tmp_path, local_data) as client:
        server.round(3, 0, state="closed")
        server.round(2, 0, state="finished")
        assert client.finished.wait(5)


def test_waits_for_the_round_model_before_training(broker, server, tmp_path, model0, local_data):
    server.model(model0)
    with make_client(broker, tmp_path, local_data) as client:
        assert wait_for(lambda: client.model_version == 0)
        server.round(2, 1)  # announces version 1, which has not arrived yet
        assert_sends_nothing_more(server, client, announcements=1, sent=0)
        server.model(next_version(model0, 1))
        _, update = server.next_update()
        assert (update.round_id, update.base_version) == (2, 1)


def test_compressed_update_follows_the_round_config(broker, server, tmp_path, model0, local_data):
    server.model(model0)
    config = TrainingConfig(epochs=1, compression=CompressionConfig("topk", density=0.05, values="f16"))
    with make_client(broker, tmp_path, local_data):
        server.round(1, 0, config=config)
        _, update = server.next_update()
        assert update.value_encoding == "f16"
        assert len(update.indices) == int(np.ceil(0.05 * model0.manifest.num_params))


def test_a_round_whose_deadline_passed_is_skipped(broker, server, tmp_path, model0, local_data):
    server.model(model0)
    with make_client(broker, tmp_path, local_data) as client:
        server.round(1, 0, deadline=time.time() - 1)
        assert_sends_nothing_more(server, client, announcements=1, sent=0)
        assert wait_for(lambda: client.counters["rounds_skipped"] == 1)


def test_a_device_without_samples_sends_nothing_and_says_why(broker, server, tmp_path, model0, caplog):
    server.model(model0)
    with make_client(broker, tmp_path) as client:
        server.round(1, 0)
        assert_sends_nothing_more(server, client, announcements=1, sent=0)
    assert "no local samples" in caplog.text


def test_samples_that_do_not_fit_the_model_are_dropped_with_a_log_line(broker, server, tmp_path,
                                                                       model0, caplog):
    client = make_client(broker, tmp_path)
    client.add_data(np.zeros((5, 10), np.float32), np.zeros(5, np.int64))  # 10 features, not 64
    server.model(model0)
    with client:
        assert wait_for(lambda: client.model_version == 0)
    assert client.num_samples == 0
    assert "dropped 5 local samples" in caplog.text
    with pytest.raises(ValueError, match=r"\(m, 64\)"):
        client.add_data(np.zeros((2, 10), np.float32), np.zeros(2, np.int64))


def test_one_bad_label_costs_only_its_row(broker, server, tmp_path, model0, caplog):
    client = make_client(broker, tmp_path)
    X = np.random.default_rng(0).uniform(0, 1, (6, 64)).astype(np.float32)
    client.add_data(X, np.array([0, 1, 12, 3, 4, 5]), lines=[2, 3, 4, 5, 6, 7])  # waits
    server.model(model0)
    with client:
        assert wait_for(lambda: client.num_samples == 5)
        assert "line 4: label 12 is not a class of this model (0..9)" in caplog.text
        X[0, 0] = np.nan
        assert client.add_data(X, np.arange(6)) == 5  # live samples: the NaN row is skipped
        assert "line 1: a NaN or infinite feature" in caplog.text
        assert client.num_samples == 10


def test_a_device_whose_labels_are_all_out_of_range_says_so(broker, server, tmp_path, model0,
                                                            caplog):
    server.model(model0)
    with make_client(broker, tmp_path) as client:
        assert wait_for(lambda: client._trainer is not None)  # the model is known: checked now
        assert client.add_data(np.zeros((3, 64), np.float32), np.array([10, 11, 12])) == 0
    assert "not one of its 3 labels is a class of the model (0..9)" in caplog.text


def test_the_status_says_when_no_sample_fits_the_model(broker, server, tmp_path, model0):
    """Samples that waited for the model and are all refused by it: the device announces
    samples 0, which keeps the server from selecting it; good samples announce it again."""
    client = make_client(broker, tmp_path)
    client.add_data(np.zeros((3, 64), np.float32), np.array([10, 11, 12]))
    with client:
        assert server.status_of("dev-1").capabilities["samples"] == 3  # not checked yet
        server.model(model0)
        assert server.status_of("dev-1").capabilities["samples"] == 0
        client.add_data(np.zeros((2, 64), np.float32), np.array([1, 2]))
        assert server.status_of("dev-1").capabilities["samples"] == 2


def test_a_new_extractor_recomputes_the_cached_features_of_every_sample(broker, server,
                                                                        tmp_path):
    """The features of stored samples are computed once; a model whose frozen extractor changed
    (same head, another graph) must not leave the old extractor's features behind."""
    rng = np.random.default_rng(3)

    def with_extractor(version):
        model = build_mlp((16, 10), seed=0, extractor=dense_extractor(
            rng.normal(0, 0.3, (64, 16)).astype(np.float32), np.zeros(16, np.float32)))
        return model.with_weights(model.weights, version=version, round_id=version)

    first, second = with_extractor(0), with_extractor(1)
    assert first.manifest == second.manifest and first.onnx_sha256 != second.onnx_sha256
    X = rng.uniform(0, 1, (20, 64)).astype(np.float32)
    client = make_client(broker, tmp_path, model_refresh=False)  # bare envelopes, no rounds
    client.add_data(X, np.arange(20) % 10)
    server.model(first)
    with client:
        # The trainer comes right after the model goes live, on the dispatcher thread.
        assert wait_for(lambda: client._trainer is not None and client._trainer.num_samples == 20)
        cached = client._trainer._X[:20].copy()
        np.testing.assert_allclose(cached, client.predictor.features(X), rtol=1e-6, atol=1e-6)
        server.model(second)
        assert wait_for(lambda: client.model_version == 1)
        assert wait_for(lambda: not np.allclose(client._trainer._X[:20], cached))
        np.testing.assert_allclose(client._trainer._X[:20], client.predictor.features(X),
                                   rtol=1e-6, atol=1e-6)
        assert client.num_samples == 20


# -- delivery: outbox, receipts, reboots ---------------------------------------------------------

def test_an_unacknowledged_update_is_resent_after_a_reboot(broker, server, tmp_path, model0,
                                                           local_data):
    server.model(model0)
    with make_client(broker, tmp_path, local_data):
        server.round(1, 0)
        _, first = server.next_update()
    # The receipt never came (server down, message lost): the update is still on disk.
    rebooted = make_client(broker, tmp_path, local_data)
    assert [(e.round_id, e.update_id) for e in rebooted.outbox.entries()] == [(1, first.update_id)]
    with rebooted:
        _, again = server.next_update()
        assert again.update_id == first.update_id  # the same update, so the server counts it once
        # and no second training for round 1 (its retained announcement came again)
        assert_sends_nothing_more(server, rebooted, announcements=1, sent=1)
        server.receipt("dev-1", 1, first.update_id, status="rejected", reason="duplicate")
        assert wait_for(lambda: len(rebooted.outbox) == 0)
        assert rebooted.rejections == ["round 1: duplicate"]


def test_updates_of_a_round_that_is_over_are_dropped(broker, server, tmp_path, model0, local_data,
                                                     caplog):
    server.model(model0)
    caplog.set_level("INFO", logger="edgefl.device.outbox")
    with make_client(broker, tmp_path, local_data) as client:
        server.round(1, 0)
        server.next_update()
        assert len(client.outbox) == 1
        server.round(2, 0, state="closed")
        assert wait_for(lambda: len(client.outbox) == 0)
    assert "round 1 without a receipt" in caplog.text


@pytest.mark.parametrize("max_staleness, version, sent, why", [
    (1, 1, True, ""),
    (1, 2, False, "it was trained on model version 0, 2 versions behind the announced 2, and the "
                  "server accepts at most 1"),
    (None, 1, False, "the server has moved on to round 2, where it can no longer count"),
], ids=["buffered", "buffered-too-stale", "synchronous"])
def test_an_update_whose_round_advanced_during_training_is_sent_if_it_can_count(
        broker, server, tmp_path, model0, local_data, caplog, max_staleness, version, sent, why):
    """Round 2 is announced while round 1 trains (long enough to be sure). Under buffered
    aggregation the update of round 1, on version 0, still counts one version behind, so it is
    sent and kept; two versions behind, or in synchronous rounds, it is not sent, and the log
    says why."""
    caplog.set_level("INFO", logger="edgefl.device.client")
    server.model(model0)
    X, y = local_data
    slow = TrainingConfig(epochs=500, batch_size=32, lr=0.01)
    with make_client(broker, tmp_path, (np.tile(X, (40, 1)), np.tile(y, 40))) as client:
        server.round(1, 0, config=slow, max_staleness=max_staleness)
        assert client.training.wait(10)
        server.round(2, version, max_staleness=max_staleness)
        # The device is behind the announced version, so it asks for the full model: the
        # announcement has been handled, and must have been while round 1 still trained.
        assert wait_for(lambda: client.counters["refresh_fallbacks"] == 1)
        assert client.training.is_set(), "training ended before round 2 was announced"
        if sent:
            _, update = server.next_update(timeout=30)
            assert (update.round_id, update.base_version) == (1, 0)
            assert [e.round_id for e in client.outbox.entries()] == [1]
        else:
            assert wait_for(lambda: not client.training.is_set(), timeout=30)
            assert_sends_nothing_more(server, client, announcements=2, sent=0)
            assert len(client.outbox) == 0 and client.counters["rounds_skipped"] == 1
            assert f"round 1: the update is not sent: {why}" in caplog.text


def test_update_sent_while_the_broker_is_down_arrives_after_it_returns(broker, server, tmp_path,
                                                                       model0, local_data):
    server.model(model0)
    with make_client(broker, tmp_path, local_data) as client:
        assert wait_for(lambda: client.model_version == 0)
        server.close()
        broker.restart(downtime=0.5)
        peer = FakeServer(broker)
        try:
            peer.round(1, 0)
            _, update = peer.next_update(timeout=15)
            assert update.round_id == 1
        finally:
            peer.close()


# -- privacy -------------------------------------------------------------------------------------

def test_privacy_budget_stops_updates_and_survives_a_reboot(broker, server, tmp_path, model0,
                                                            local_data, caplog):
    server.model(model0)
    private = TrainingConfig(epochs=1, privacy=PrivacyConfig("laplace", epsilon=1.0, clip=1.0))
    with make_client(broker, tmp_path, local_data, privacy_budget=1.5) as client:
        server.round(1, 0, config=private)
        _, update = server.next_update()
        assert np.abs(update.values).sum() > 1.0  # clipped to L1 1.0, then Laplace noise added
        assert client.privacy_spent == pytest.approx(1.0)
        server.round(2, 0, config=private)
        assert_sends_nothing_more(server, client, announcements=2, sent=1)
    assert "privacy budget spent" in caplog.text
    rebooted = make_client(broker, tmp_path, local_data, privacy_budget=1.5)
    assert rebooted.privacy_spent == pytest.approx(1.0)  # a reboot does not refill the budget
    with rebooted:
        server.round(3, 0, config=private)  # after round 2's, retained
        assert_sends_nothing_more(server, rebooted, announcements=2, sent=0)
        server.round(4, 0)  # without privacy the update costs nothing and is sent
        _, update = server.next_update()
        assert update.round_id == 4


def test_noise_does_not_come_from_the_training_seed(broker, server, tmp_path, model0, local_data):
    """Two devices with the same data and seed must not produce the same noised update."""
    server.model(model0)
    private = TrainingConfig(epochs=1, privacy=PrivacyConfig("laplace", epsilon=1.0, clip=1.0))
    a = make_client(broker, tmp_path, local_data, name="dev-a", seed=3).start(timeout=5)
    b = make_client(broker, tmp_path, local_data, name="dev-b", seed=3).start(timeout=5)
    try:
        server.round(1, 0, config=private)
        updates = {u.client_id: u.values for _, u in (server.next_update(), server.next_update())}
        assert not np.array_equal(updates["dev-a"], updates["dev-b"])
    finally:
        a.stop()
        b.stop()


def test_stats_are_written_to_the_state_dir(broker, server, tmp_path, model0, local_data):
    server.model(model0)
    with make_client(broker, tmp_path, local_data) as client:
        assert wait_for(lambda: client.model_version == 0)
        client.predict(local_data[0][:1])
    path = client.write_stats(extra={"note": 1})
    stats = json.loads(path.read_text())
    assert stats["model_version"] == 0 and stats["note"] == 1
    assert stats["predictor"]["count"] == 1
    assert not list(path.parent.glob("*.tmp"))


def test_a_device_that_requires_privacy_skips_rounds_without_it(broker, server, tmp_path, model0,
                                                               local_data, caplog):
    server.model(model0)
    with make_client(broker, tmp_path, local_data, require_privacy=True) as client:
        server.round(1, 0)  # announced with privacy "none"
        assert_sends_nothing_more(server, client, announcements=1, sent=0)
        assert wait_for(lambda: client.counters["rounds_skipped"] == 1)
        server.round(2, 0, config=TrainingConfig(
            epochs=1, privacy=PrivacyConfig("laplace", epsilon=1.0, clip=1.0)))
        _, update = server.next_update()
        assert update.round_id == 2
    assert "requires differential privacy (--require-privacy)" in caplog.text


def test_the_privacy_budget_outlives_a_fresh_state_directory(broker, server, tmp_path, model0,
                                                            local_data):
    server.model(model0)
    budget_file = tmp_path / "device" / "privacy.json"
    private = TrainingConfig(epochs=1, privacy=PrivacyConfig("laplace", epsilon=1.0, clip=1.0))
    with make_client(broker, tmp_path / "run1", local_data, privacy_budget=1.5,
                     privacy_file=budget_file) as client:
        server.round(1, 0, config=private)
        server.next_update()
        assert wait_for(lambda: client.privacy_spent == pytest.approx(1.0))
    again = make_client(broker, tmp_path / "run2", local_data, privacy_budget=1.5,
                        privacy_file=budget_file)
    assert again.privacy_spent == pytest.approx(1.0)


# -- compressed model refreshes -------------------------------------------------------------------

def refreshed(model, seed, density=0.05, encoding="f16"):
    """(refresh payload, next model) as the server makes them: the next version is exactly what
    the refresh rebuilds."""
    from edgefl.wire.refresh import build_refresh
    rng = np.random.default_rng(seed)
    n = model.manifest.num_params
    indices = np.sort(rng.choice(n, int(density * n), replace=False)).astype(np.uint32)
    payload, refresh = build_refresh(
        model.weights, indices, rng.normal(0, 0.01, indices.size).astype(np.float32), encoding,
        base_version=model.version, version=model.version + 1, round_id=model.version + 1,
        onnx_sha256=model.onnx_sha256)
    return payload, model.with_weights(refresh.apply(model.weights), version=refresh.version,
                                       round_id=refresh.round_id)


def saved(tmp_path, model, server, name="dev-1"):
    """A device state directory that already holds ``model`` (as after an earlier run: signed),
    so the device starts on refreshes without reading the retained envelope at all."""
    from edgefl.device.saved_model import SavedModel
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    SavedModel(tmp_path / name).save_full(server.signer.sign("model", encode_model(model)))


def publish_version(server, payload, model, *, refresh_too=True):
    """What the aggregation server publishes for a new version, in its order."""
    server.model(model)  # retained full envelope for newcomers
    if refresh_too:
        server.publish(TOPICS.refresh, payload, retain=False)
    server.round(model.version + 1, model.version, state="closed")


def test_follows_refreshes_exactly_without_reading_full_envelopes(broker, server, tmp_path,
                                                                   model0):
    server.model(model0)
    saved(tmp_path, model0, server)
    with make_client(broker, tmp_path) as client:
        assert wait_for(lambda: client.connected.is_set())
        after_first = client.counters["bytes_down"]
        model = model0
        for seed in (1, 2, 3):
            payload, model = refreshed(model, seed)
            publish_version(server, payload, model)
        assert wait_for(lambda: client.counters["refreshes_applied"] == 3)
        assert client.model_version == 3
        assert client.predictor.model.weights.tobytes() == model.weights.tobytes()
        assert client.counters["refresh_fallbacks"] == 0
        # three refreshes and announcements, and none of the three full envelopes
        assert client.counters["bytes_down"] - after_first < len(encode_model(model))
    # a reboot rebuilds version 3 from the saved full model and refreshes, hash-checked
    rebooted = make_client(broker, tmp_path)
    assert rebooted.model_version == 3
    assert rebooted.predictor.model.weights.tobytes() == model.weights.tobytes()


def test_a_refresh_that_does_not_rebuild_the_model_falls_back_to_the_full_envelope(
        broker, server, tmp_path, model0):
    server.model(model0)
    saved(tmp_path, model0, server)
    with make_client(broker, tmp_path) as client:
        assert wait_for(lambda: client.connected.is_set())
        # a refresh built on other weights: its hash cannot match what this device rebuilds
        other = model0.with_weights(model0.weights + np.float32(1e-3), version=0, round_id=0)
        payload, _ = refreshed(other, 1)
        _, model1 = refreshed(model0, 1)
        publish_version(server, payload, model1)
        assert wait_for(lambda: client.model_version == 1)
        assert client.predictor.model.weights.tobytes() == model1.weights.tobytes()
        assert client.counters["refresh_fallbacks"] == 1
        assert client.counters["refreshes_applied"] == 0


@pytest.mark.parametrize("session_kept", [True, False])
def test_a_device_that_missed_versions_catches_up_exactly(broker, server, tmp_path, model0,
                                                          session_kept):
    """Away for three versions: with its persistent session the broker delivers the refreshes it
    missed, in order; with the session gone it sees the announcement of a newer version and
    takes the full envelope. Either way it ends on the server's weights, bit for bit."""
    server.model(model0)
    saved(tmp_path, model0, server)
    expiry = 3600 if session_kept else 0
    with make_client(broker, tmp_path, session_expiry=expiry) as client:
        assert wait_for(lambda: client.connected.is_set()) and client.model_version == 0
    model = model0
    for seed in (1, 2, 3):
        payload, model = refreshed(model, seed)
        publish_version(server, payload, model)
    with make_client(broker, tmp_path, session_expiry=expiry) as client:
        assert wait_for(lambda: client.model_version == 3)
        assert client.predictor.model.weights.tobytes() == model.weights.tobytes()
        # counted just after the swap: waited for, not read at once
        assert wait_for(lambda: client.counters["refreshes_applied"] == (3 if session_kept else 0))
        assert client.counters["refresh_fallbacks"] == (0 if session_kept else 1)


def status_where(server, client_id, predicate, timeout=10):
    """The first status of ``client_id`` for which ``predicate`` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = server.status_of(client_id, timeout=timeout)
        if predicate(status):
            return status
    raise AssertionError(f"no status of {client_id} met the condition within {timeout} s")


@pytest.mark.parametrize("mechanism, accept, why", [
    ("distributed-skellam", None, "this edgefl version does not implement it"),
    ("laplace", ("central-gaussian",), "this device does not accept it"),
])
def test_an_announced_mechanism_the_device_does_not_support_is_declined_in_its_status(
        broker, server, tmp_path, model0, local_data, mechanism, accept, why):
    server.model(model0)
    with make_client(broker, tmp_path, local_data, accept_mechanisms=accept) as client:
        first = server.status_of("dev-1")
        assert first.available and first.mechanisms == (accept or client.accept_mechanisms)
        server.round(1, 0, config=TrainingConfig(epochs=1, privacy=PrivacyConfig(mechanism)))
        status = status_where(server, "dev-1", lambda s: s.declined_round == 1)
        reason = status.capabilities["declined"]["reason"]
        assert f"privacy mechanism {mechanism!r} is not supported" in reason and why in reason
        assert status.available  # another round may announce a mechanism it takes part with
        assert_sends_nothing_more(server, client, announcements=1, sent=0)
        server.round(2, 0, config=TrainingConfig(epochs=1, privacy=PrivacyConfig(
            "central-gaussian", clip=0.5)))
        _, update = server.next_update()
        assert update.round_id == 2
        assert np.linalg.norm(update.values) <= 0.5 * (1 + 1e-6)  # clipped, no noise added


def test_a_spent_budget_and_missing_samples_are_said_in_the_status(broker, server, tmp_path,
                                                                   model0, local_data):
    server.model(model0)
    private = TrainingConfig(epochs=1, privacy=PrivacyConfig("laplace", epsilon=1.0, clip=1.0))
    with make_client(broker, tmp_path, local_data, privacy_budget=1.5):
        assert server.status_of("dev-1").available
        server.round(1, 0, config=private)
        server.next_update()
        status = status_where(server, "dev-1", lambda s: not s.available)  # another won't fit
        assert "privacy budget spent: epsilon 1 of 1.5" in status.capabilities["unavailable"]
        assert status.capabilities["privacy_guarantee"].startswith("local: replace-one")
    with make_client(broker, tmp_path, name="dev-empty") as empty:
        status = server.status_of("dev-empty")
        assert not status.available and status.capabilities["unavailable"] == "no local samples"
        empty.add_data(*local_data)
        assert status_where(server, "dev-empty", lambda s: s.available).capabilities["samples"]


# -- trust ---------------------------------------------------------------------------------------

def test_a_frozen_server_is_noticed_and_replays_do_not_hide_it(broker, server, tmp_path, model0,
                                                               caplog):
    server.model(model0)
    caplog.set_level("INFO", logger="edgefl.device.client")
    with make_client(broker, tmp_path, freeze_after=1.5) as client:
        server.round(1, 0, state="closed")
        assert wait_for(lambda: client.stats()["last_round"] == -1 and client._announcement)
        frame = server.signer.sign("round", RoundAnnouncement(1, 0, time.time() + 60,
                                                              state="closed").to_json())
        server.control.publish(TOPICS.round, frame, qos=1, retain=True).wait_for_publish(5)
        assert wait_for(lambda: "no fresh verified round announcement" in caplog.text, 10)
        # The same signed announcement again (a replay of the newest one) is not fresh.
        server.control.publish(TOPICS.round, frame, qos=1, retain=True).wait_for_publish(5)
        assert wait_for(lambda: client.counters["announcements"] == 3)  # the replay, handled
        assert client.announcement_age > 1.5
        assert client.stats()["announcement_age_s"] > 1.5
        server.round(1, 0, state="closed")  # signed anew: the server is alive
        # The line comes just after the device took the announcement as fresh: wait for it.
        assert wait_for(lambda: "fresh round announcements arrive again" in caplog.text)
        assert client.announcement_age < 1.0


def test_rotated_keys_replace_the_pinned_ones(broker, server, tmp_path, model0):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from edgefl.trust import key_notice

    new_signing, new_sealing = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    with make_client(broker, tmp_path) as client:
        server.publish(TOPICS.key, key_notice(new_signing.public_key(), new_sealing.public_key()))
        assert wait_for(lambda: client._trust.signing_key_id != server.signer.key_id.hex())
        server.model(model0)  # signed with the old key: no longer accepted
        assert wait_for(lambda: client.counters["refused_signature"] >= 1)
        server.signer = Signer(new_signing, FLEET)
        server.model(model0)
        assert wait_for(lambda: client.model_version == 0)
    rebooted = make_client(broker, tmp_path)  # the rotation was saved
    assert rebooted._trust.signing_key_id == server.signer.key_id.hex()
