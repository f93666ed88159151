"""The attacks of ``docs/security.md`` against a live federation on a provisioned Mosquitto.

Three honest devices (real :class:`EdgeClient` objects) and the aggregation server run two
rounds on the broker configuration ``edgefl fleet init`` generates. Each attack is made once the
second round is open (every device runs model version 1): by ``evil``, a provisioned device,
where the broker's ACL is the defence, or with the server's own broker login, standing for an
attacker the broker cannot stop (its operator, a stolen login), where the devices' signature
checks are the defence. Every attack must be refused, say so in the refusing side's counters,
and leave the run's result equal to the run without it.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.device.client import EdgeClient
from edgefl.simulation.datasets import dirichlet_partition, load_digits
from edgefl.wire.protocol import PrivacyConfig, Receipt, RoundAnnouncement, Topics, TrainingConfig
from edgefl.transport.mqtt import BrokerRefused
from edgefl.trust import Signer, seal
from edgefl.wire import Update, encode_model, encode_update
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.mosquitto import MosquittoBroker, free_port
from edgefl_server.model_builder import build_mlp
from edgefl_server.provisioning import add_device, init_fleet, revoke_device

pytestmark = pytest.mark.integration

FLEET = "demo"
TOPICS = Topics(FLEET)
HONEST = ("dev-1", "dev-2", "dev-3")
FLEET_DEVICES = HONEST + ("evil",)
TRAINING = TrainingConfig(epochs=1, batch_size=16, lr=0.1)


class Raw:
    """A raw paho client logged in as ``username`` (None: anonymous), recording what it gets."""

    def __init__(self, broker, username=None, password=None, topics=()):
        self.connack = threading.Event()
        self.acks: dict[int, object] = {}
        self.messages: list[tuple[str, bytes]] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=username or "anonymous", protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(broker.fleet.ca_cert))
        if username is not None:
            client.username_pw_set(username, password)

        def on_connect(c, userdata, flags, code, properties):
            self.code = code
            if not code.is_failure and topics:
                c.subscribe([(t, 1) for t in topics])
            self.connack.set()

        client.on_connect = on_connect
        client.on_publish = lambda c, u, mid, code, p: self.acks.setdefault(mid, code)
        client.on_message = lambda c, u, msg: self.messages.append((msg.topic, msg.payload))
        client.connect(broker.host, broker.port)
        client.loop_start()
        assert self.connack.wait(10), "no CONNACK"
        self.client = client

    def publish(self, topic, payload, retain=False):
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        deadline = time.monotonic() + 10
        while mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.acks.get(mid)

    def close(self):
        # DISCONNECT first: the network thread then ends at once, not after its 1-s select
        self.client.disconnect()
        self.client.loop_stop()


def server_login(broker, control=False, topics=()):
    creds = broker.fleet.server_credentials()
    name = creds["control_username"] if control else creds["username"]
    return Raw(broker, name, creds["password"], topics)


def device_login(broker, name, topics=()):
    return Raw(broker, name, (broker.fleet.bundle(name) / "password").read_text(), topics)


class Federation:
    """The server and the honest devices of one run; ``frames`` records every signed model and
    announcement the server published (as an observer sees them)."""

    def __init__(self, broker, tmp_path):
        self.broker, self.fleet = broker, broker.fleet
        config = ServerConfig(broker_url=broker.url, fleet=FLEET, state_dir=tmp_path / "server",
                              rounds=2, min_clients=3, round_timeout=60.0, training=TRAINING,
                              seed=0, fleet_dir=self.fleet.directory)
        self.server = AggregationServer(config, initial_model=build_mlp((64, 16, 10), seed=0))
        X, y, _, _ = load_digits(0)
        parts = dirichlet_partition(y, len(HONEST), alpha=0.5, seed=0)
        self.devices = {}
        for name, part in zip(HONEST, parts):
            bundle = self.fleet.bundle(name)
            device = EdgeClient(name, FLEET, broker.url, tmp_path / name, seed=0,
                                username=name, password=(bundle / "password").read_text(),
                                ca_certs=str(bundle / "ca.crt"), trust=bundle / "trust.json",
                                reconnect_delay=(0.1, 0.5),
                                # An attack made with the server's own login takes its MQTT
                                # session over for a moment: a receipt (QoS 0) sent then is
                                # lost, and the device resends its update after this long.
                                receipt_timeout=3.0,
                                # Full envelopes: every retained model reaches the devices (a
                                # device following refreshes would not even read a rogue one).
                                model_refresh=False)
            device.add_data(X[part], y[part])
            self.devices[name] = device
        observer = self.fleet.observer_credentials()
        self.observer = Raw(broker, observer["username"], observer["password"],
                            [TOPICS.model, TOPICS.round])

    def frames(self, topic):
        return [payload for t, payload in self.observer.messages if t == topic]

    def run(self, attack=None, settled=None):
        """Run both rounds, calling ``attack(self)`` once round 2 is open; return the history.

        ``settled(self)``, if given, must hold (within 30 s) before the devices stop: the run
        can end a moment before a device has handled its last receipt."""
        try:
            for device in self.devices.values():
                device.start(timeout=10)
            self.server.start()
            deadline = time.monotonic() + 60
            while not (self.server.round.round_id == 2 and self.server.round.phase == "open"
                       and all(d.model_version == 1 for d in self.devices.values())):
                assert time.monotonic() < deadline, "round 2 did not open"
                time.sleep(0.02)
            if attack is not None:
                attack(self)
            assert self.server.wait(60), "the run did not finish"
            deadline = time.monotonic() + 20
            while not all(d.finished.is_set() for d in self.devices.values()):
                assert time.monotonic() < deadline, "devices did not see the end"
                time.sleep(0.02)
            deadline = time.monotonic() + 30
            while settled is not None and not settled(self):
                assert time.monotonic() < deadline, "the devices did not settle"
                time.sleep(0.02)
        finally:
            self.server.stop()
            for device in self.devices.values():
                device.stop()
            self.observer.close()
        return self.server.history


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The run without any attack: its final weights and per-round counts."""
    root = tmp_path_factory.mktemp("clean")
    fleet, _ = init_fleet(root / "fleet", FLEET, port=free_port())
    for name in HONEST:
        add_device(fleet.directory, name)
    with MosquittoBroker(fleet=fleet, any_port=True) as broker:
        federation = Federation(broker, root)
        history = federation.run()
    return federation.server.model.weights, [(r.accepted, r.rejected) for r in history]


def run_attacked(secure_broker, tmp_path, clean, attack, settled=None):
    federation = Federation(secure_broker, tmp_path)
    history = federation.run(attack, settled)
    weights, counts = clean
    assert [(r.accepted, r.rejected) for r in history] == counts
    np.testing.assert_allclose(federation.server.model.weights, weights, rtol=1e-5, atol=1e-6)
    for name, device in federation.devices.items():  # and no device was fooled meanwhile
        assert device.model_version == federation.server.model.version == 2, name
        assert device.stats()["last_round"] == 2, name
    return federation


def refusals(federation, counter):
    return {name: d.counters[counter] for name, d in federation.devices.items()}


def rogue_model(version=1000):
    model = build_mlp((64, 16, 10), seed=0)
    return model.with_weights(np.zeros_like(model.weights), version=version, round_id=version)


# -- what the broker's ACL stops ---------------------------------------------------------------------

def test_a_device_cannot_publish_a_retained_model_or_announcement(secure_broker, tmp_path, clean):
    codes = {}

    def attack(fed):
        evil = device_login(fed.broker, "evil")
        codes["model"] = evil.publish(TOPICS.model, encode_model(rogue_model()), retain=True)
        codes["round"] = evil.publish(TOPICS.round, RoundAnnouncement(
            999999, 1000, time.time() + 60).to_json(), retain=True)
        codes["receipt"] = evil.publish(TOPICS.receipt("dev-1"), Receipt(2, 1, "accepted").to_json())
        evil.close()

    run_attacked(secure_broker, tmp_path, clean, attack)
    assert all(code.is_failure and "authorized" in str(code) for code in codes.values()), codes


def test_a_device_cannot_publish_on_another_devices_topic(secure_broker, tmp_path, clean):
    codes = []

    def attack(fed):
        evil = device_login(fed.broker, "evil")
        n = fed.server.model.manifest.num_params
        forged = encode_update(Update("dev-3", 2, 1, 7, 1_000_000, n, None,
                                      np.full(n, 5.0, np.float32)))
        sealing = fed.fleet.sealing_key().public_key()
        codes.append(evil.publish(TOPICS.update("dev-3"), seal(
            forged, sealing, fleet=FLEET, client_id="dev-3", round_id=2)))
        evil.close()

    federation = run_attacked(secure_broker, tmp_path, clean, attack)
    assert codes[0].is_failure and "authorized" in str(codes[0])
    assert federation.server.metrics.rejected == {}  # it never reached the server


def test_a_device_cannot_read_other_devices_updates_or_receipts(secure_broker, tmp_path, clean):
    spies = []

    def attack(fed):
        spies.append(device_login(fed.broker, "evil", [TOPICS.all_updates, f"{TOPICS.prefix}/#"]))

    # Subscribed before the devices send their round 2 updates and get their receipts.
    run_attacked(secure_broker, tmp_path, clean, attack)
    spy = spies[0]
    spy.close()
    topics = {t for t, _ in spy.messages}
    assert topics <= {TOPICS.model, TOPICS.round}, topics  # what every device may read


@pytest.mark.parametrize("who", ["anonymous", "wrong password", "revoked"])
def test_logins_that_are_not_valid_are_refused(secure_broker, tmp_path, clean, who):
    results = {}

    def attack(fed):
        if who == "anonymous":
            raw = Raw(fed.broker)
        elif who == "wrong password":
            raw = Raw(fed.broker, "dev-1", "not-the-password")
        else:
            bundle = fed.fleet.bundle("evil")
            password = (bundle / "password").read_text()
            revoke_device(fed.fleet.directory, "evil")
            device = EdgeClient("evil", FLEET, fed.broker.url, tmp_path / "evil",
                                username="evil", password=password,
                                ca_certs=str(bundle / "ca.crt"), trust=bundle / "trust.json")
            with pytest.raises(BrokerRefused, match="refused the login of 'evil'"):
                device.start(timeout=20)
            raw = Raw(fed.broker, "evil", password)
        results["code"] = raw.code
        raw.close()

    run_attacked(secure_broker, tmp_path, clean, attack)
    assert results["code"].is_failure and "authorized" in str(results["code"]).lower()


# -- what the devices' signature checks stop (an attacker the broker lets through) ---------------

def _unsigned(fed, tmp_path):
    return encode_model(rogue_model())


def _signed_by_another_key(fed, tmp_path):
    other, _ = init_fleet(tmp_path / "other-fleet", FLEET, port=free_port())
    return Signer(other.signing_key(), FLEET).sign("model", encode_model(rogue_model()))


def _older_signed_model(fed, tmp_path):
    return fed.frames(TOPICS.model)[0]  # model version 0, validly signed


def _signed_for_another_fleet(fed, tmp_path):
    # The same server key, signing for another fleet: the fleet is inside the signature.
    return Signer(fed.fleet.signing_key(), "other").sign("model", encode_model(rogue_model()))


@pytest.mark.parametrize("forge,counter", [
    (_unsigned, "refused_signature"), (_signed_by_another_key, "refused_signature"),
    (_older_signed_model, "refused_replay"), (_signed_for_another_fleet, "refused_misbound"),
], ids=["unsigned", "another key", "older signed model replayed", "another fleet"])
def test_a_rogue_retained_model_is_refused(secure_broker, tmp_path, clean, forge, counter):
    def attack(fed):
        control = server_login(fed.broker, control=True)
        code = control.publish(TOPICS.model, forge(fed, tmp_path), retain=True)
        assert not code.is_failure  # through the broker: the devices' checks must hold
        control.close()

    federation = run_attacked(secure_broker, tmp_path, clean, attack)
    assert all(n >= 1 for n in refusals(federation, counter).values())


def test_forged_and_replayed_announcements_are_refused(secure_broker, tmp_path, clean):
    def attack(fed):
        no_privacy = TrainingConfig(privacy=PrivacyConfig("none"))
        forged = RoundAnnouncement(999999, 1, time.time() + 60, no_privacy).to_json()
        control = server_login(fed.broker, control=True)
        control.publish(TOPICS.round, forged, retain=True)
        # A validly signed announcement of round 1, replayed, and a signed receipt as a round.
        control.publish(TOPICS.round, fed.frames(TOPICS.round)[0], retain=True)
        receipt = Signer(fed.fleet.signing_key(), FLEET).sign(
            "receipt", Receipt(2, 1, "accepted").to_json(), subject="dev-1")
        control.publish(TOPICS.round, receipt, retain=True)
        control.close()

    federation = run_attacked(secure_broker, tmp_path, clean, attack)
    for name, device in federation.devices.items():
        assert device.counters["refused_signature"] >= 1, name
        assert device.counters["refused_replay"] >= 1, name
        assert device.counters["refused_misbound"] >= 1, name
        assert device.stats()["last_round"] == 2  # never 999999


def test_forged_receipts_are_refused(secure_broker, tmp_path, clean):
    sent = {}

    def attack(fed):
        server = server_login(fed.broker)
        signer = Signer(fed.fleet.signing_key(), FLEET)
        entries = fed.devices["dev-1"].outbox.entries()  # the worst case: the right ids
        for entry in entries:
            server.publish(TOPICS.receipt("dev-1"), Receipt(
                entry.round_id, entry.update_id, "accepted").to_json())
        server.publish(TOPICS.receipt("dev-1"), Receipt(2, 1, "rejected", "forged").to_json())
        sent["unsigned"] = len(entries) + 1
        server.publish(TOPICS.receipt("dev-1"), signer.sign(
            "receipt", Receipt(2, 1, "rejected", "for dev-2").to_json(), subject="dev-2"))
        server.close()

    # The devices stop once dev-1's round-2 update has its real receipt. (Logging in with the
    # server's own login takes the server's MQTT session over for a moment: receipts it sends
    # then are lost; dev-1 resends an update still in its outbox, but one of round 1 that round
    # 2 already ended gets no second receipt, which is harmless: the server counted it.)
    federation = run_attacked(secure_broker, tmp_path, clean, attack,
                              settled=lambda fed: fed.devices["dev-1"].outbox.entries() == [])
    dev1 = federation.devices["dev-1"]
    # every forged receipt was refused, and none was counted as an answer
    assert dev1.counters["refused_signature"] == sent["unsigned"]
    assert dev1.counters["refused_misbound"] == 1
    assert dev1.rejections == [] and 1 <= dev1.counters["accepted"] <= 2
