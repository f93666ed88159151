"""End to end against a real Mosquitto: the aggregation server in this process, devices as real
device processes on the digits task (``edgefl client`` with the simulation's prediction load,
:mod:`edgefl.simulation.device_process`, each with its part of digits as a ``--data`` file) and,
for the one round that also runs under aarch64 emulation, EdgeClients in this process.

Faults are made deterministic with signals: a device frozen with SIGSTOP before a round opens is
still "online" (its retained status says so), so the server selects it and the round waits for
it; what happens next (SIGKILL and a reboot, a broker restart, SIGCONT) is then certainly
mid-round.

The broker runs a provisioned fleet's configuration (TLS, logins, ACL); the server signs and
opens sealed updates, the devices run from their bundles.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edgefl.device.client import EdgeClient
from edgefl.wire.protocol import DeviceStatus, Topics, TrainingConfig
from edgefl.transport.mqtt import MqttConnection
from edgefl.simulation.datasets import (digits_evaluator, digits_partition_files,
                                       dirichlet_partition, load_digits)
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.model_builder import build_mlp

pytestmark = pytest.mark.integration

FLEET = "demo"
FLEET_DEVICES = tuple(f"dev-{i}" for i in range(4))
TRAINING = TrainingConfig(epochs=5, batch_size=16, lr=0.1, momentum=0.9)


class Fleet:
    """Device processes of one test, each with its own state directory and log."""

    def __init__(self, broker, root, count, extra=()):
        self.broker, self.root, self.count, self.extra = broker, root, count, list(extra)
        self.processes: dict[int, subprocess.Popen] = {}
        self.data = digits_partition_files(root / "data", count, seed=0)

    def name(self, i):
        return f"dev-{i}"

    def state(self, i):
        return self.root / self.name(i)

    def start(self, i):
        state = self.state(i)
        state.mkdir(parents=True, exist_ok=True)
        with open(state / "device.log", "ab") as log:
            self.processes[i] = subprocess.Popen(
                [sys.executable, "-m", "edgefl.simulation.device_process",
                 "--bundle", str(self.broker.fleet.bundle(self.name(i))),
                 "--broker", self.broker.url, "--state-dir", str(state),
                 "--data", str(self.data[i]), "--seed", "0",
                 "--predict-rate", "100", "--connect-timeout", "20", "--exit-when-finished",
                 *self.extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def start_all(self):
        for i in range(self.count):
            self.start(i)

    def signal(self, i, signum):
        os.kill(self.processes[i].pid, signum)

    def stop(self, i, timeout=20):
        """SIGTERM: the device finishes, says offline, writes its stats; returns its exit code."""
        p = self.processes[i]
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
        return p.wait(timeout)

    def wait(self, i, timeout=60):
        """The exit code of a device that stops by itself (--exit-when-finished)."""
        return self.processes[i].wait(timeout)

    def kill_all(self):
        for p in self.processes.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def log(self, i):
        return (self.state(i) / "device.log").read_text(errors="replace")

    def stats(self, i):
        return json.loads((self.state(i) / "stats.json").read_text())

    def predictions(self, i):
        with np.load(self.state(i) / "predictions.npz") as records:
            return {k: records[k] for k in records.files}


class OnlineWatch:
    """Which devices of the fleet say "online" right now (their retained status)."""

    def __init__(self, broker):
        self.online: set[str] = set()
        self.changed = threading.Condition()
        topics = Topics(FLEET)

        def on_status(msg):
            state = DeviceStatus.from_json(msg.payload).state if msg.payload else "offline"
            with self.changed:
                (self.online.add if state == "online" else self.online.discard)(
                    topics.client_of(msg.topic))
                self.changed.notify_all()

        creds = broker.fleet.observer_credentials()
        self.conn = MqttConnection(creds["username"], broker.url, username=creds["username"],
                                   password=creds["password"], ca_certs=str(broker.fleet.ca_cert),
                                   session_expiry=0, subscriptions=[(topics.all_status, 1)],
                                   on_message=on_status,
                                   reconnect_delay=(0.1, 0.5)).start(timeout=5)

    def wait(self, predicate, timeout=60):
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.online), timeout), \
                f"devices online: {sorted(self.online)}"

    def close(self):
        self.conn.stop()


@pytest.fixture
def broker(secure_broker):
    return secure_broker


@pytest.fixture
def devices(broker, tmp_path):
    made = {}

    def make(count, extra=()):
        made["fleet"] = Fleet(broker, tmp_path / "devices", count, extra)
        return made["fleet"]

    yield make
    if "fleet" in made:
        made["fleet"].kill_all()


@pytest.fixture
def watch(broker):
    w = OnlineWatch(broker)
    yield w
    w.close()


def make_server(broker, tmp_path, *, rounds, min_clients, on_round=None, round_timeout=30.0):
    config = ServerConfig(broker_url=broker.url, fleet=FLEET, state_dir=tmp_path / "server",
                          rounds=rounds, min_clients=min_clients, round_timeout=round_timeout,
                          training=TRAINING, seed=0, fleet_dir=broker.fleet.directory)
    return AggregationServer(config, initial_model=build_mlp((64, 32, 10), seed=0),
                             evaluate=digits_evaluator(0), on_round=on_round)


def finish(server, fleet, timeout=60):
    """Wait for the last round, then for every device to exit by itself: a device exits once the
    run is finished and it holds the final model, however long getting there takes."""
    try:
        assert server.wait(timeout), f"rounds done: {[r.round_id for r in server.history]}"
    finally:
        server.stop()
    for i in fleet.processes:
        assert fleet.wait(i) == 0, fleet.log(i)


def assert_everyone_on_the_final_model(server, fleet):
    final = server.model.version
    assert final == len(server.history)  # every round produced a new model
    for i in fleet.processes:
        stats = fleet.stats(i)
        assert stats["model_version"] == final, fleet.log(i)
        records = fleet.predictions(i)
        assert stats["prediction_errors"] == 0
        assert np.all(np.diff(records["version"]) >= 0)  # versions only ever go forward


@pytest.mark.cpu
def test_one_round_with_devices_in_this_process(broker, tmp_path, watch):
    """The smallest whole federation: two devices train, compress and send one round's update,
    the server aggregates them and publishes model 1, and both devices serve it."""
    X, y, X_test, _ = load_digits(0)
    devices = []
    try:
        for i, part in enumerate(dirichlet_partition(y, 2, alpha=0.5, seed=0)):
            bundle = broker.fleet.bundle(f"dev-{i}")
            device = EdgeClient(f"dev-{i}", FLEET, broker.url, tmp_path / f"dev-{i}",
                                reconnect_delay=(0.1, 0.5), username=f"dev-{i}",
                                password=(bundle / "password").read_text(),
                                ca_certs=str(bundle / "ca.crt"), trust=bundle / "trust.json")
            device.add_data(X[part], y[part])
            devices.append(device.start(timeout=30))
        watch.wait(lambda online: len(online) == 2)
        server = make_server(broker, tmp_path, rounds=1, min_clients=2).start()
        try:
            assert server.wait(120), "the round did not finish"
        finally:
            server.stop()
        assert [(r.round_id, r.accepted) for r in server.history] == [(1, 2)]
        for device in devices:  # "finished" is only set once the device holds the final model
            assert device.finished.wait(60), f"{device.client_id} never got model 1"
            assert device.model_version == 1
            assert device.predict(X_test[:8]).shape == (8, 10)
    finally:
        for device in devices:
            device.stop()


def test_rounds_with_device_processes_improve_accuracy(broker, tmp_path, devices, watch):
    devices = devices(4)
    devices.start_all()
    watch.wait(lambda online: len(online) == 4)
    server = make_server(broker, tmp_path, rounds=4, min_clients=4).start()
    finish(server, devices)
    accuracy = [r.metrics["accuracy"] for r in server.history]
    assert [r.accepted for r in server.history] == [4, 4, 4, 4]
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy
    assert_everyone_on_the_final_model(server, devices)
    for i in range(4):
        stats = devices.stats(i)
        assert stats["accepted"] == 4 and stats["outbox"] == 0
        assert stats["predictions"] > 0


def wait_accepted(server, count, timeout=30):
    """Wait until the server has accepted ``count`` updates in all."""
    deadline = time.monotonic() + timeout
    while server.metrics.accepted < count:
        assert time.monotonic() < deadline, f"{server.metrics.accepted} update(s) accepted"
        time.sleep(0.05)


def test_a_device_that_crashes_mid_round_and_reboots_still_counts(broker, tmp_path, devices, watch):
    devices = devices(2)
    devices.start_all()
    watch.wait(lambda online: len(online) == 2)
    devices.signal(1, signal.SIGSTOP)  # still "online", so the round selects it and waits
    server = make_server(broker, tmp_path, rounds=2, min_clients=2).start()
    wait_accepted(server, 1)  # dev-0 has answered round 1 ...
    assert server.history == []  # ... which waits for dev-1
    devices.signal(1, signal.SIGKILL)  # a crash: no clean goodbye, the Last Will says offline
    devices.processes[1].wait()
    watch.wait(lambda online: "dev-1" not in online)
    devices.start(1)  # the reboot, same state directory
    finish(server, devices)
    assert [r.accepted for r in server.history] == [2, 2]
    assert server.history[0].close_reason == "every selected device answered"
    assert_everyone_on_the_final_model(server, devices)


def test_a_device_offline_for_a_whole_round_catches_up(broker, tmp_path, devices, watch):
    devices = devices(3)
    devices.start_all()
    watch.wait(lambda online: len(online) == 3)
    assert devices.stop(2) == 0  # goes offline cleanly before round 1

    def on_round(result):
        if result.round_id == 1:  # bring dev-2 back before round 2 opens
            devices.start(2)
            watch.wait(lambda online: "dev-2" in online)

    server = make_server(broker, tmp_path, rounds=3, min_clients=2, on_round=on_round).start()
    finish(server, devices)
    # Round 2 may open before the server has processed dev-2's "online"; round 3 cannot.
    assert server.history[0].accepted == 2 and "dev-2" not in server.history[0].selected
    assert server.history[-1].accepted == 3
    assert_everyone_on_the_final_model(server, devices)
    assert devices.stats(2)["last_round"] == 3


def test_broker_restart_mid_round(broker, tmp_path, devices, watch):
    devices = devices(2)
    devices.start_all()
    watch.wait(lambda online: len(online) == 2)
    devices.signal(1, signal.SIGSTOP)  # round 1 cannot close until dev-1 answers
    server = make_server(broker, tmp_path, rounds=2, min_clients=2).start()
    wait_accepted(server, 1)  # dev-0's update is in: the restart comes mid-round
    broker.restart(downtime=1.0)
    devices.signal(1, signal.SIGCONT)
    finish(server, devices)
    assert [r.accepted for r in server.history] == [2, 2]
    assert_everyone_on_the_final_model(server, devices)


def _wait_open(server, round_id=1, timeout=30):
    deadline = time.monotonic() + timeout
    while not (server.round.phase == "open" and server.round.round_id == round_id):
        assert time.monotonic() < deadline, f"round {round_id} did not open"
        time.sleep(0.05)


def test_a_broker_without_persistence_restarts_and_a_device_reboots(fleet, tmp_path):
    """The broker forgets every retained message and session; the server republishes its model
    and announcement when it reconnects, so the rebooted device rejoins and every update counts
    exactly once."""
    from edgefl_server.mosquitto import MosquittoBroker

    with MosquittoBroker(fleet=fleet, persistence=False, any_port=True) as broker:
        watch = OnlineWatch(broker)
        try:
            # An update that reaches the restarted broker before the server has subscribed again
            # is dropped (nobody subscribed): the device's outbox sends it again, here after 3 s.
            fleet_devices = Fleet(broker, tmp_path / "devices", 2,
                                  extra=["--receipt-timeout", "3"])
            fleet_devices.start_all()
            watch.wait(lambda online: len(online) == 2)
            rounds_done = threading.Event()
            server = make_server(broker, tmp_path, rounds=2, min_clients=2,
                                 on_round=lambda r: rounds_done.set()).start()
            assert rounds_done.wait(60), "round 1 did not close"
            fleet_devices.signal(1, signal.SIGKILL)  # the device's reboot starts
            fleet_devices.processes[1].wait()
            broker.restart(downtime=0.5)  # ... and the broker forgets everything
            fleet_devices.start(1)
            finish(server, fleet_devices, timeout=90)
        finally:
            watch.close()
            if "fleet_devices" in locals():
                fleet_devices.kill_all()
    assert [r.accepted for r in server.history] == [2, 2]
    assert [sorted(r.selected) for r in server.history] == [["dev-0", "dev-1"]] * 2
    assert_everyone_on_the_final_model(server, fleet_devices)


def test_an_update_the_broker_acknowledged_and_then_lost_is_resent(fleet, tmp_path):
    """The broker acknowledges dev-0's update and crashes before saving it: the device's outbox
    resends it once its receipt is overdue, and the server counts it exactly once."""
    from edgefl_server.mosquitto import MosquittoBroker

    # Nothing is saved between start and the crash: what the broker acknowledged is lost.
    with MosquittoBroker(fleet=fleet, autosave_interval=3600, any_port=True) as broker:
        watch = OnlineWatch(broker)
        try:
            fleet_devices = Fleet(broker, tmp_path / "devices", 2,
                                  extra=["--receipt-timeout", "3"])
            fleet_devices.start_all()
            watch.wait(lambda online: len(online) == 2)
            for i in range(2):  # still "online": selected, but they train only once resumed
                fleet_devices.signal(i, signal.SIGSTOP)
            server = make_server(broker, tmp_path, rounds=1, min_clients=2, round_timeout=120)
            server.start()
            _wait_open(server)
            server.stop()  # the updates wait in the broker's session for the server ...
            for i in range(2):
                fleet_devices.signal(i, signal.SIGCONT)
            outbox = fleet_devices.state(0) / "outbox"
            deadline = time.monotonic() + 60
            while not (any(outbox.glob("*.update")) and "sent update" in fleet_devices.log(0)):
                assert time.monotonic() < deadline, fleet_devices.log(0)
                time.sleep(0.05)
            time.sleep(0.3)  # PUBACK received
            broker.kill()  # ... and is gone with the broker
            broker.start()
            server = make_server(broker, tmp_path, rounds=1, min_clients=2, round_timeout=120)
            server.start()
            finish(server, fleet_devices, timeout=90)
        finally:
            watch.close()
            if "fleet_devices" in locals():
                fleet_devices.kill_all()
    assert [r.accepted for r in server.history] == [2]
    assert "sending it again" in fleet_devices.log(0)
    assert fleet_devices.stats(0)["accepted"] == 1 and fleet_devices.stats(0)["outbox"] == 0
