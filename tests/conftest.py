"""Shared fixtures: a real Mosquitto broker on a free loopback port."""
import pytest

from edgefl_server.broker import MosquittoBroker


@pytest.fixture
def broker(tmp_path):
    """A fresh Mosquitto for one test; fails (never skips) when mosquitto is not installed."""
    with MosquittoBroker(persistence_dir=tmp_path / "broker") as b:
        yield b
