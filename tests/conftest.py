"""Shared fixtures: real Mosquitto brokers on free loopback ports.

``secure_broker`` runs the configuration ``edgefl fleet init`` generates (TLS, logins, ACL), the
way a user deploys it; ``broker`` is the anonymous plain-MQTT broker of ``--insecure`` runs, for
tests of the transport itself.
"""
import pytest

from edgefl_server.mosquitto import MosquittoBroker, free_port
from edgefl_server.provisioning import add_device, init_fleet

#: Devices the ``fleet`` fixture provisions.
FLEET_DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")


@pytest.fixture
def broker(tmp_path):
    """A fresh anonymous Mosquitto for one test; fails (never skips) when it is not installed."""
    with MosquittoBroker(persistence_dir=tmp_path / "broker") as b:
        yield b


@pytest.fixture
def fleet(tmp_path):
    """A provisioned fleet ``demo`` on a free port with the devices of :data:`FLEET_DEVICES`."""
    fleet, _ = init_fleet(tmp_path / "fleet", "demo", port=free_port())
    for device in FLEET_DEVICES:
        add_device(fleet.directory, device)
    return fleet


@pytest.fixture
def secure_broker(fleet):
    """Mosquitto running ``fleet``'s generated configuration on loopback."""
    with MosquittoBroker(fleet=fleet) as b:
        yield b
