"""Planned key rotation: ``edgefl fleet rotate-keys``, the server's notice, devices that follow.

The federation runs on the broker configuration ``edgefl fleet init`` generates, with real
:class:`EdgeClient` devices, and one provisioned device driven by hand (``raw``) so that the
test decides which sealing key each of its updates is sealed to. The keys rotate while round 2
is open; a device whose bundle was copied before the rotation connects only afterwards.
"""
from __future__ import annotations

import json
import shutil
import stat
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.cli import fleet as fleet_cli
from edgefl.device.client import EdgeClient
from edgefl.simulation.datasets import dirichlet_partition, load_digits
from edgefl.trust import (Sealer, Signer, SignatureInvalid, key_id, key_notice, open_signed,
                          signing_public_key)
from edgefl.trust.keys import raw_public
from edgefl.wire import Update, encode_update
from edgefl.wire.protocol import MECHANISMS, DeviceStatus, Receipt, Topics, TrainingConfig
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.provisioning import (KEY_CHECK_INTERVAL, add_device, check_private_files,
                                        finish_rotation, init_fleet, promote_rotation)
from edgefl_server.mosquitto import free_port

FLEET = "demo"
TOPICS = Topics(FLEET)
HONEST = ("dev-1", "dev-2", "dev-3")
FLEET_DEVICES = HONEST + ("raw", "late")
TRAINING = TrainingConfig(epochs=1, batch_size=16, lr=0.1)


def wait_for(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Raw:
    """A paho client logged in as ``username``, recording the messages of ``topics``."""

    def __init__(self, broker, username, password, topics=()):
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        connected = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username,
                             protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(broker.fleet.ca_cert))
        client.username_pw_set(username, password)

        def on_connect(c, userdata, flags, code, properties):
            if topics:
                c.subscribe([(t, 1) for t in topics])
            connected.set()

        def on_message(c, userdata, msg):
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload)))

        client.on_connect, client.on_message = on_connect, on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        assert connected.wait(10), "no CONNACK"
        self.client = client

    def received(self, topic):
        with self.lock:
            return [payload for t, payload in self.messages if t == topic]

    def publish(self, topic, payload, retain=False):
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class HandDevice:
    """Provisioned device ``raw``: online, and answering a round with an update sealed to the
    sealing key the test names."""

    def __init__(self, broker):
        password = (broker.fleet.bundle("raw") / "password").read_text()
        self.conn = Raw(broker, "raw", password, [TOPICS.receipt("raw")])
        self.conn.publish(TOPICS.status("raw"), DeviceStatus("online", {
            "samples": 50, "mechanisms": list(MECHANISMS), "available": True}).to_json(),
            retain=True)

    def answer(self, round_id, base_version, num_params, sealing_key, signing_key) -> Receipt:
        """Send an update for ``round_id`` sealed to ``sealing_key``; its receipt, verified
        with ``signing_key``."""
        update = Update("raw", round_id, base_version, round_id, 50, num_params, None,
                        np.zeros(num_params, np.float32))
        sealed = Sealer(sealing_key).seal(encode_update(update), fleet=FLEET, client_id="raw",
                                          round_id=round_id)
        seen = len(self.conn.received(TOPICS.receipt("raw")))
        self.conn.publish(TOPICS.update("raw"), sealed)
        wait_for(lambda: len(self.conn.received(TOPICS.receipt("raw"))) > seen,
                 f"no receipt for the update of round {round_id}", timeout=30)
        frame = self.conn.received(TOPICS.receipt("raw"))[seen]
        message = open_signed(frame, signing_key, fleet=FLEET, kind="receipt", subject="raw")
        return Receipt.from_json(message.payload)

    def close(self):
        self.conn.publish(TOPICS.status("raw"), b"", retain=True)
        self.conn.close()


def make_device(broker, name, state_dir, trust, data=None):
    bundle = broker.fleet.bundle(name)
    device = EdgeClient(name, FLEET, broker.url, state_dir, seed=0, username=name,
                        password=(bundle / "password").read_text(),
                        ca_certs=str(bundle / "ca.crt"), trust=trust,
                        reconnect_delay=(0.1, 0.5), model_refresh=False)
    if data is not None:
        device.add_data(*data)
    return device


def public_keys(fleet):
    trust = json.loads(fleet.trust_file.read_text())
    return signing_public_key(trust["signing_key"]), trust


def run_cli(fleet_dir, *args):
    return fleet_cli.main(["--dir", str(fleet_dir), "rotate-keys", *args])


# -- a federation whose keys rotate ----------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two ingestion workers"])
def test_the_keys_rotate_between_rounds_and_every_device_follows(secure_broker, tmp_path,
                                                                 workers, capsys):
    fleet = secure_broker.fleet
    old_signing = fleet.signing_key().public_key()
    old_sealing = fleet.sealing_key().public_key()
    # The copy of its bundle a device that stays offline through the rotation holds.
    late_trust, dev1_trust = tmp_path / "late-trust.json", tmp_path / "dev-1-trust.json"
    shutil.copy(fleet.bundle("late") / "trust.json", late_trust)
    shutil.copy(fleet.bundle("dev-1") / "trust.json", dev1_trust)  # what dev-1 holds
    config = ServerConfig(broker_url=secure_broker.url, fleet=FLEET,
                          state_dir=tmp_path / "server", rounds=3, min_clients=4,
                          round_timeout=60.0, training=TRAINING, seed=0,
                          fleet_dir=fleet.directory, ingest_workers=workers)
    server = AggregationServer(config, initial_model=build_mlp((64, 16, 10), seed=0))
    num_params = server._initial_model.manifest.num_params
    X, y, _, _ = load_digits(0)
    parts = dirichlet_partition(y, len(HONEST), alpha=0.5, seed=0)
    devices = {name: make_device(secure_broker, name, tmp_path / name,
                                 fleet.bundle(name) / "trust.json", (X[part], y[part]))
               for name, part in zip(HONEST, parts)}
    observer_login = fleet.observer_credentials()
    observer = Raw(secure_broker, observer_login["username"], observer_login["password"],
                   [TOPICS.model])
    hand = HandDevice(secure_broker)
    try:
        for device in devices.values():
            device.start(timeout=10)
        server.start()
        wait_for(lambda: server.round.round_id == 1 and server.round.phase == "open",
                 "round 1 did not open")
        assert hand.answer(1, 0, num_params, old_sealing, old_signing).status == "accepted"
        wait_for(lambda: server.round.round_id == 2 and server.round.phase == "open"
                 and all(d.model_version == 1 for d in devices.values()),
                 "round 2 did not open")

        assert run_cli(fleet.directory) == 0
        assert "rotate-keys --finish" in capsys.readouterr().out
        wait_for(lambda: (fleet.path("server", "previous", "sealing.key").exists()
                          and not fleet.path("server", "next").exists()),
                 "the running server did not promote the rotation", timeout=10)
        new_signing, trust = public_keys(fleet)
        new_sealing = fleet.sealing_key().public_key()
        assert key_id(new_signing) != key_id(old_signing)
        wait_for(lambda: all(d.stats()["signing_key"] == key_id(new_signing).hex()
                             for d in devices.values()), "a device did not follow the notice")
        # dev-1 as it would be after a reboot now: its saved model 1 is signed with the old key.
        # (Files are replaced by rename: a temporary file may vanish while the copy runs.)
        shutil.copytree(tmp_path / "dev-1", tmp_path / "dev-1-rebooted",
                        ignore=shutil.ignore_patterns("*.tmp"))
        time.sleep(2 * KEY_CHECK_INTERVAL + 0.5)  # every ingestion worker has looked since
        # An update sealed to the replaced key, by a device that has not read the notice, is
        # accepted, and its receipt is signed with the new key.
        assert hand.answer(2, 1, num_params, old_sealing, new_signing).status == "accepted"
        wait_for(lambda: server.round.round_id == 3 and server.round.phase == "open"
                 and all(d.model_version == 2 for d in devices.values()),
                 "round 3 did not open (or a device refused model version 2)")
        assert hand.answer(3, 2, num_params, new_sealing, new_signing).status == "accepted"
        assert server.wait(60), "the run did not finish"
        wait_for(lambda: all(d.finished.is_set() for d in devices.values()),
                 "devices did not see the end", timeout=20)
    finally:
        server.stop()
        for device in devices.values():
            device.stop()
        hand.close()
        observer.close()

    # Every round counted all four devices: real devices' updates sealed to the new key
    # (round 3), the hand device's to the old one (round 2), nothing refused.
    assert [(r.accepted, r.rejected) for r in server.history] == [(4, {})] * 3
    assert server.metrics.rejected == {}
    for name, device in devices.items():
        assert device.model_version == 3, name
    rebooted = make_device(secure_broker, "dev-1", tmp_path / "dev-1-rebooted", dev1_trust)
    assert rebooted.model_version == 1  # serves its saved model before it connects
    # Models after the rotation verify with the new key only.
    last = observer.received(TOPICS.model)[-1]
    assert open_signed(last, new_signing, fleet=FLEET, kind="model")
    with pytest.raises(SignatureInvalid):
        open_signed(last, old_signing, fleet=FLEET, kind="model")
    # trust.json, every bundle's copy and the bundle of a device added now name the new keys.
    add_device(fleet.directory, "after")
    for bundle in [fleet.bundle(d) for d in FLEET_DEVICES + ("after",)]:
        assert json.loads((bundle / "trust.json").read_text()) == trust, bundle
    assert trust["sealing_key"] == raw_public(new_sealing).hex()
    assert check_private_files(fleet) == []
    assert stat.S_IMODE(fleet.path("server", "previous", "sealing.key").stat().st_mode) == 0o600

    # A broker that lost the retained notice gets it again from a (re)started server; the device
    # that was offline through the rotation reads it before the model signed with the new key.
    control = fleet.server_credentials()
    Raw(secure_broker, control["control_username"], control["password"]).publish(
        TOPICS.key, b"", retain=True)
    restarted = AggregationServer(config)
    late = make_device(secure_broker, "late", tmp_path / "late", late_trust)
    try:
        restarted.start()
        late.start(timeout=10)
        wait_for(lambda: late.model_version == 3, "the late device did not catch up", 30)
    finally:
        restarted.stop()
        late.stop()
    assert late.stats()["signing_key"] == key_id(new_signing).hex()
    assert late.counters["refused_signature"] == 0  # the notice came first


@pytest.mark.integration
def test_a_forged_notice_is_refused_and_a_real_one_followed(secure_broker, tmp_path):
    fleet = secure_broker.fleet
    signing = fleet.signing_key().public_key()
    devices = [make_device(secure_broker, name, tmp_path / name, fleet.bundle(name) / "trust.json")
               for name in ("dev-1", "dev-2")]
    control = fleet.server_credentials()
    attacker = Raw(secure_broker, control["control_username"], control["password"])
    other, _ = init_fleet(tmp_path / "other", FLEET, port=free_port())
    try:
        for device in devices:
            device.start(timeout=10)
        # A notice naming the attacker's keys, signed with a key the devices do not pin.
        attacker.publish(TOPICS.key, Signer(other.signing_key(), FLEET).sign("key", key_notice(
            other.signing_key().public_key(), other.sealing_key().public_key())), retain=True)
        wait_for(lambda: all(d.counters["refused_signature"] >= 1 for d in devices),
                 "a device did not refuse the forged notice", 20)
        for device in devices:
            assert device.stats()["signing_key"] == key_id(signing).hex()
        # The same keys announced by the fleet's own key: followed.
        attacker.publish(TOPICS.key, Signer(fleet.signing_key(), FLEET).sign("key", key_notice(
            other.signing_key().public_key(), other.sealing_key().public_key())), retain=True)
        wait_for(lambda: all(d.stats()["signing_key"] == key_id(other.signing_key()).hex()
                             for d in devices), "a device did not follow the real notice", 20)
    finally:
        for device in devices:
            device.stop()
        attacker.close()


# -- the command -----------------------------------------------------------------------------------

def test_rotate_keys_steps_outputs_and_exit_codes(fleet, tmp_path, capsys):
    old = json.loads(fleet.trust_file.read_text())
    assert run_cli(fleet.directory) == 0
    out = capsys.readouterr().out
    assert "will replace" in out and "rotate-keys --finish" in out
    for name in ("signing.key", "sealing.key"):
        path = fleet.path("server", "next", name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pending = fleet.path("server", "next", "signing.key").read_bytes()
    assert json.loads(fleet.trust_file.read_text()) == old  # nothing changes before the server

    # A pending rotation is never replaced without --replace.
    assert run_cli(fleet.directory) == 2
    err = capsys.readouterr().err
    assert "pending already" in err and "--replace" in err and "nothing was changed" in err
    assert fleet.path("server", "next", "signing.key").read_bytes() == pending
    assert run_cli(fleet.directory, "--finish") == 2
    assert "not published yet" in capsys.readouterr().err
    assert run_cli(fleet.directory, "--replace") == 0
    assert "discarded the pending rotation" in capsys.readouterr().out
    assert fleet.path("server", "next", "signing.key").read_bytes() != pending

    # What the server does: sign the notice with the current key, then switch.
    signer = Signer(fleet.signing_key(), FLEET)
    rotation, notice = promote_rotation(fleet.directory, lambda p: signer.sign("key", p))
    assert open_signed(notice, signer.public_key, fleet=FLEET, kind="key")
    assert fleet.key_notice() == notice
    assert json.loads(fleet.trust_file.read_text())["signing_key"] != old["signing_key"]
    assert key_id(fleet.signing_key()).hex() == rotation.signing_to
    assert len(fleet.sealing_keys()) == 2
    assert promote_rotation(fleet.directory, lambda p: pytest.fail("nothing to sign")) is None

    # The grace period ends only on --finish; until then no new rotation starts.
    assert run_cli(fleet.directory) == 2
    err = capsys.readouterr().err
    assert "is not finished" in err and "rotate-keys --finish" in err
    assert run_cli(fleet.directory, "--finish") == 0
    assert rotation.sealing_from in capsys.readouterr().out
    assert len(fleet.sealing_keys()) == 1
    assert fleet.key_notice() == notice  # still retained: late devices follow it
    assert run_cli(fleet.directory, "--finish") == 2
    assert "no rotation to finish" in capsys.readouterr().err
    assert run_cli(fleet.directory) == 0  # the next rotation may start


def test_rotate_keys_bad_usage_and_a_missing_fleet_directory(tmp_path, capsys):
    assert run_cli(tmp_path / "nowhere") == 2
    err = capsys.readouterr().err
    assert "is not a fleet directory" in err and "edgefl fleet init" in err
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, "--finish", "--replace")
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        fleet_cli.main(["rotate-keys", "--help"])
    assert exit_info.value.code == 0
    assert "--finish" in capsys.readouterr().out


def test_a_promotion_interrupted_by_a_crash_is_completed_with_the_same_notice(fleet):
    signer = Signer(fleet.signing_key(), FLEET)
    assert run_cli(fleet.directory) == 0
    next_keys = {n: fleet.path("server", "next", n).read_bytes()
                 for n in ("signing.key", "sealing.key")}
    _, notice = promote_rotation(fleet.directory, lambda p: signer.sign("key", p))
    # As if the server died after switching the keys but before removing server/next/.
    fleet.path("server", "next").mkdir(mode=0o700)
    for name, data in next_keys.items():
        fleet.path("server", "next", name).write_bytes(data)
        fleet.path("server", "next", name).chmod(0o600)
    rotation, again = promote_rotation(fleet.directory, lambda p: pytest.fail("signed again"))
    assert again == notice and key_id(fleet.signing_key()).hex() == rotation.signing_to
    assert not fleet.path("server", "next").exists()
    finish_rotation(fleet.directory)
