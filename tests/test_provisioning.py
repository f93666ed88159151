"""Provisioning (edgefl_server.provisioning) checked against a real Mosquitto running its output."""
import json
import os
import stat
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from edgefl_server.provisioning import (MAX_INGEST_WORKERS, ProvisioningError, add_device,
                                        check_private_files, hash_password, init_fleet,
                                        open_fleet, reload_broker, revoke_device)

pytestmark = pytest.mark.integration


class Probe:
    """A raw paho client that records what the broker answered."""

    def __init__(self, broker, fleet, username=None, password=None, client_id="probe"):
        self.connack = threading.Event()
        self.events = {}
        self.messages = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(fleet.ca_cert))
        if username is not None:
            c.username_pw_set(username, password)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda c, u, mid, codes, p: self.events.setdefault(("sub", mid), codes)
        c.on_publish = lambda c, u, mid, code, p: self.events.setdefault(("pub", mid), code)
        c.on_message = lambda c, u, msg: self.messages.append((msg.topic, msg.payload))
        c.on_disconnect = lambda *a: self.events.setdefault("disconnect", True)
        self.client = c
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert self.connack.wait(10), "no CONNACK"

    def _on_connect(self, client, userdata, flags, code, properties):
        self.code = code
        self.connack.set()

    def wait(self, key, timeout=10.0):
        deadline = time.monotonic() + timeout
        while key not in self.events and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.events.get(key)

    def publish(self, topic, payload, retain=False):
        return self.wait(("pub", self.client.publish(topic, payload, qos=1, retain=retain).mid))

    def subscribe(self, topic):
        return self.wait(("sub", self.client.subscribe(topic, qos=1)[1]))

    def close(self):
        # DISCONNECT first: the network thread then ends at once, not after its 1-s select
        self.client.disconnect()
        self.client.loop_stop()


def _device(broker, fleet, device):
    password = (fleet.bundle(device) / "password").read_text()
    return Probe(broker, fleet, device, password, client_id=device)


def test_password_hashes_have_mosquitto_2s_format():
    digest = hash_password("secret", salt=bytes(12))
    kind, iterations, salt, value = digest.split("$")[1:]
    assert (kind, iterations, salt) == ("7", "101", "AAAAAAAAAAAAAAAA")
    import base64
    import hashlib
    assert base64.b64decode(value) == hashlib.pbkdf2_hmac("sha512", b"secret", bytes(12), 101, 64)


def test_anonymous_and_wrong_password_connections_are_refused(secure_broker, fleet):
    anonymous = Probe(secure_broker, fleet)
    assert anonymous.code.is_failure and "authorized" in str(anonymous.code)
    wrong = Probe(secure_broker, fleet, "dev-1", "not-the-password")
    assert wrong.code.is_failure and "authorized" in str(wrong.code)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (Linux: its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_broker_listens_on_the_fleets_tls_port_only(secure_broker, fleet):
    """No option may open Mosquitto's default plain listener (0.0.0.0:1883) next to the TLS one."""
    assert listening_ports(secure_broker.process.pid) == {secure_broker.port}


def test_a_device_publishes_only_on_its_own_topics(secure_broker, fleet):
    dev = _device(secure_broker, fleet, "dev-1")
    assert not dev.code.is_failure
    assert not dev.publish("edgefl/demo/clients/dev-1/update", b"u").is_failure
    assert not dev.publish("edgefl/demo/clients/dev-1/status", b"s").is_failure
    for topic in ("edgefl/demo/clients/dev-2/update", "edgefl/demo/model", "edgefl/demo/round",
                  "edgefl/demo/clients/dev-1/receipt", "edgefl/demo/key",
                  "edgefl/other/clients/dev-1/update"):
        code = dev.publish(topic, b"x", retain=True)
        assert code.is_failure and "authorized" in str(code), topic
    dev.close()


def test_a_device_reads_no_other_devices_updates_and_only_its_own_receipts(secure_broker, fleet):
    spy = _device(secure_broker, fleet, "dev-2")
    spy.subscribe("edgefl/demo/clients/+/update")
    spy.subscribe("edgefl/demo/clients/+/receipt")
    spy.subscribe("edgefl/demo/model")
    victim = _device(secure_broker, fleet, "dev-1")
    server = fleet.server_credentials()
    srv = Probe(secure_broker, fleet, server["username"], server["password"],
                client_id=server["username"])
    srv.subscribe("edgefl/demo/clients/+/update")
    control = Probe(secure_broker, fleet, server["control_username"], server["password"],
                    client_id=server["control_username"])
    assert not victim.publish("edgefl/demo/clients/dev-1/update", b"secret").is_failure
    assert not srv.publish("edgefl/demo/clients/dev-1/receipt", b"r1").is_failure
    assert not srv.publish("edgefl/demo/clients/dev-2/receipt", b"r2").is_failure
    assert not control.publish("edgefl/demo/model", b"m").is_failure
    # The broker queued whatever it forwards to the spy before acknowledging it, so once a last
    # message, published after those acknowledgements, reaches the spy, everything else has.
    assert not srv.publish("edgefl/demo/clients/dev-2/receipt", b"last").is_failure
    deadline = time.monotonic() + 10
    while ("edgefl/demo/clients/dev-2/receipt", b"last") not in spy.messages \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(spy.messages) == [("edgefl/demo/clients/dev-2/receipt", b"last"),
                                    ("edgefl/demo/clients/dev-2/receipt", b"r2"),
                                    ("edgefl/demo/model", b"m")]
    assert ("edgefl/demo/clients/dev-1/update", b"secret") in srv.messages
    for p in (spy, victim, srv, control):
        p.close()


def test_ingestion_worker_logins_read_updates_and_write_receipts_only(secure_broker, fleet):
    password = fleet.server_credentials()["password"]
    workers = [Probe(secure_broker, fleet, f"edgefl-server-demo.w{i}", password,
                     client_id=f"edgefl-server-demo.w{i}") for i in (0, MAX_INGEST_WORKERS - 1)]
    for worker in workers:
        assert not worker.code.is_failure
        worker.subscribe("edgefl/demo/clients/+/update")
        worker.subscribe("edgefl/demo/clients/+/status")
    device = _device(secure_broker, fleet, "dev-1")
    assert not device.publish("edgefl/demo/clients/dev-1/update", b"u1").is_failure
    assert not device.publish("edgefl/demo/clients/dev-1/status", b"online").is_failure
    assert not workers[0].publish("edgefl/demo/clients/dev-1/receipt", b"r").is_failure
    for topic in ("edgefl/demo/model", "edgefl/demo/round", "edgefl/demo/key",
                  "edgefl/demo/clients/dev-1/update", "edgefl/demo/clients/dev-1/status"):
        code = workers[0].publish(topic, b"x")
        assert code.is_failure and "authorized" in str(code), topic
    deadline = time.monotonic() + 10
    while not all(w.messages for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a status, were it readable, arrives now
    for worker in workers:
        assert worker.messages == [("edgefl/demo/clients/dev-1/update", b"u1")]
    beyond = Probe(secure_broker, fleet, f"edgefl-server-demo.w{MAX_INGEST_WORKERS}", password,
                   client_id=f"edgefl-server-demo.w{MAX_INGEST_WORKERS}")
    assert beyond.code.is_failure
    for p in (*workers, device, beyond):
        p.close()


def test_rerunning_init_gives_an_older_fleet_directory_the_worker_logins(secure_broker, fleet):
    passwd = fleet.path("broker", "passwd")
    older = [line for line in passwd.read_text().splitlines() if ".w" not in line.split(":")[0]]
    passwd.write_text("\n".join(older) + "\n")
    acl = fleet.path("broker", "acl")
    acl.write_text(acl.read_text().split("user edgefl-server-demo.w0")[0])
    assert reload_broker(fleet)
    password = fleet.server_credentials()["password"]

    def worker_login():
        probe = Probe(secure_broker, fleet, "edgefl-server-demo.w1", password,
                      client_id="edgefl-server-demo.w1")
        probe.close()
        return probe.code

    assert worker_login().is_failure
    _, written = init_fleet(fleet.directory, "demo", port=fleet.port)
    assert sorted(written) == ["broker/acl", "broker/passwd"]
    assert reload_broker(fleet)
    deadline = time.monotonic() + 10
    while worker_login().is_failure:  # the broker reloads its files asynchronously
        assert time.monotonic() < deadline, "the worker login stayed refused"
        time.sleep(0.1)


def test_the_share_group_is_named_from_the_servers_password(fleet, tmp_path):
    group = fleet.share_group()
    assert group == open_fleet(fleet.directory).share_group()  # stable: every worker agrees
    assert fleet.server_credentials()["password"] not in group
    assert group.startswith("edgefl-") and len(group) == len("edgefl-") + 32
    other, _ = init_fleet(tmp_path / "other", "demo", port=fleet.port)
    assert other.share_group() != group  # another fleet directory, another password


def test_revoking_a_device_disconnects_it_and_refuses_its_login(secure_broker, fleet):
    dev = _device(secure_broker, fleet, "dev-3")
    password = (fleet.bundle("dev-3") / "password").read_text()
    assert revoke_device(fleet.directory, "dev-3") is True  # the running broker was told
    assert dev.wait("disconnect") is True
    again = Probe(secure_broker, fleet, "dev-3", password, client_id="dev-3")
    assert again.code.is_failure
    assert not (fleet.bundle("dev-3") / "password").exists()
    assert "dev-3" in open_fleet(fleet.directory).revoked()
    other = _device(secure_broker, fleet, "dev-4")
    assert not other.code.is_failure


def test_rerunning_init_and_add_device_changes_nothing(fleet):
    before = {p: p.read_bytes() for p in fleet.directory.rglob("*") if p.is_file()}
    again, created = init_fleet(fleet.directory, "demo", port=fleet.port)
    assert created == [] and again == fleet
    bundle, new = add_device(fleet.directory, "dev-1")
    assert not new
    after = {p: p.read_bytes() for p in fleet.directory.rglob("*") if p.is_file()}
    assert after == before


def test_init_refuses_to_turn_a_directory_into_another_fleet(fleet):
    with pytest.raises(ProvisioningError, match="already holds fleet 'demo'"):
        init_fleet(fleet.directory, "other", port=fleet.port)


def test_private_keys_and_credentials_are_private(fleet):
    assert check_private_files(fleet) == []
    for name in ("password", "device.env"):
        assert stat.S_IMODE((fleet.bundle("dev-1") / name).stat().st_mode) == 0o600
    (fleet.path("server", "signing.key")).chmod(0o644)
    assert check_private_files(fleet) == [fleet.path("server", "signing.key")]


def test_the_broker_certificate_names_loopback_and_the_given_host(tmp_path):
    f, _ = init_fleet(tmp_path / "f", "demo", host="broker.example.org", port=8883)
    cert = x509.load_pem_x509_certificate(f.path("broker", "broker.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.example.org"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_device_bundle_holds_what_the_device_needs(fleet):
    bundle = fleet.bundle("dev-2")
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["client_id"] == meta["username"] == "dev-2" and meta["fleet"] == "demo"
    assert json.loads((bundle / "trust.json").read_text()) == json.loads(
        fleet.trust_file.read_text())
    assert (bundle / "ca.crt").read_bytes() == fleet.ca_cert.read_bytes()
    assert f"--bundle {bundle}" in (bundle / "command.txt").read_text()
    for name in ("edgefl-server-demo", "edgefl-server-demo.control", "edgefl-server-demo.w0",
                 "edgefl-server-demo.w9", "edgefl-observer-demo"):
        with pytest.raises(ProvisioningError, match="server's logins"):
            add_device(fleet.directory, name)


def _listening_sockets(pid):
    """(address, port) of every TCP socket process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in (Path("/proc") / str(pid) / "net" / table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((address, int(port, 16)))
    return found


def test_the_broker_listens_only_on_its_tls_port_on_loopback(secure_broker):
    # 0100007F is 127.0.0.1 in /proc's byte order; no default listener (1883, every interface)
    assert _listening_sockets(secure_broker.process.pid) == [("0100007F", secure_broker.port)]
