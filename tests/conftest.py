"""Shared fixtures: real Mosquitto brokers on free loopback ports.

``secure_broker`` runs the configuration ``edgefl fleet init`` generates (TLS, logins, ACL), the
way a user deploys it; ``broker`` is the anonymous plain-MQTT broker of ``--insecure`` runs, for
tests of the transport itself.

With ``EDGEFL_DEBUG_KERNELS=1`` the compiled kernels are the bounds-checking build of
``make test-debug-kernels`` (``build/debug-kernels``), loaded under their own names before
anything imports them.
"""
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import pytest

#: The compiled kernel modules (edgefl.kernels._MODULES, named here so that nothing loads them first).
DEBUG_KERNEL_MODULES = ("clip", "noise", "topk", "codec", "sgd")


def _load_debug_kernels() -> None:
    """Put the bounds-checking build of every compiled kernel into sys.modules."""
    import edgefl._kernels  # the package only: importing edgefl.kernels would load the normal build

    directory = Path(__file__).resolve().parent.parent / "build" / "debug-kernels" / "edgefl" / "_kernels"
    for name in DEBUG_KERNEL_MODULES:
        found = [directory / f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                 if (directory / f"{name}{suffix}").exists()]
        if not found:
            raise RuntimeError(f"EDGEFL_DEBUG_KERNELS=1 but {directory} has no {name} module: "
                               "build it with `make test-debug-kernels`")
        spec = importlib.util.spec_from_file_location(f"edgefl._kernels.{name}", found[0])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(edgefl._kernels, name, module)


if os.environ.get("EDGEFL_DEBUG_KERNELS") == "1":
    _load_debug_kernels()

from edgefl_server.mosquitto import MosquittoBroker, free_port  # noqa: E402 - after the kernels
from edgefl_server.provisioning import add_device, init_fleet  # noqa: E402

#: Devices the ``fleet`` fixture provisions.
FLEET_DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")


def _run(broker: MosquittoBroker):
    """Start ``broker`` for one test; kill it afterwards: a graceful stop saves state nobody
    reads again, and Mosquitto can take 0.1 s to act on SIGTERM."""
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()
        broker.close()


@pytest.fixture
def broker(tmp_path):
    """A fresh anonymous Mosquitto for one test; fails (never skips) when it is not installed."""
    yield from _run(MosquittoBroker(persistence_dir=tmp_path / "broker"))


@pytest.fixture
def fleet(request, tmp_path):
    """A provisioned fleet ``demo`` on a free port with a bundle for each device of the test
    module's ``FLEET_DEVICES`` (:data:`FLEET_DEVICES` by default)."""
    fleet, _ = init_fleet(tmp_path / "fleet", "demo", port=free_port())
    for device in getattr(request.module, "FLEET_DEVICES", FLEET_DEVICES):
        add_device(fleet.directory, device)
    return fleet


@pytest.fixture
def secure_broker(fleet):
    """Mosquitto running ``fleet``'s generated configuration on loopback."""
    yield from _run(MosquittoBroker(fleet=fleet, any_port=True))
