"""Launching Mosquitto on a free loopback port: the embedded broker of ``edgefl server`` and
``edgefl simulate`` when no ``--broker`` is given, and the broker of the test suite.

Production runs its own broker (Mosquitto, EMQX, VerneMQ, HiveMQ) and passes ``--broker``. edgefl
ships no broker of its own: where Mosquitto is missing, :class:`BrokerUnavailable` says how to
install it.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edgefl_server.provisioning import mosquitto_config

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


#: What to do when Mosquitto is not installed (``make setup`` installs it on Debian/Ubuntu).
MOSQUITTO_MISSING = (
    "mosquitto is not installed; install it, or pass --broker mqtt://HOST:PORT to use a broker "
    "that runs elsewhere:\n"
    "  Debian/Ubuntu: sudo apt-get install mosquitto\n"
    "  Fedora:        sudo dnf install mosquitto\n"
    "  macOS:         brew install mosquitto\n"
    "  Windows:       the installer from https://mosquitto.org/download/ or choco install mosquitto"
)


class BrokerUnavailable(RuntimeError):
    """No broker could be started here."""


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` executable, or None. Debian installs it in /usr/sbin."""
    return shutil.which("mosquitto", path=_SEARCH_PATH)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class _PortTaken(BrokerUnavailable):
    """The port was taken by another process (retried when the port was ours to choose)."""


class MosquittoBroker:
    """A private Mosquitto process listening on one loopback port.

    Parameters
    ----------
    port : int, optional
        Port to listen on; a free one by default.
    persistence_dir : path, optional
        Keep retained messages and persistent sessions here across :meth:`restart` (a real
        broker restart keeps them too). A temporary directory by default.
    max_packet_size : int
        Largest MQTT packet the broker accepts, in bytes.
    fleet : edgefl_server.provisioning.Fleet, optional
        Run the fleet's provisioned configuration (TLS on the fleet's port, logins, ACL) on
        loopback, as a user would deploy it; ``port`` and ``persistence_dir`` are then the
        fleet's. Without it the broker is an anonymous plain-MQTT one (``--insecure`` runs and
        tests of the plain transport only).
    persistence : bool
        With ``fleet``: False starts a broker that forgets retained messages and sessions when
        it stops (a broker deployed without persistence).
    autosave_interval : int
        With ``fleet``: seconds between saves of the broker's state; what arrived since the
        last save is lost when the broker is killed (:meth:`kill`).
    any_port : bool
        With ``fleet``: listen on a free loopback port instead of the fleet's (the simulation
        and the tests, which tell their clients :attr:`url`).

    A port chosen here (no ``port``, or ``any_port``) is chosen again if another process takes
    it before Mosquitto binds it (the first start only: a restart keeps its port).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, port: int | None = None, *, persistence_dir=None, max_packet_size=16 << 20,
                 fleet=None, persistence: bool = True, autosave_interval: int = 1,
                 any_port: bool = False):
        self.host = "127.0.0.1"
        self.fleet = fleet
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self._tmp = tempfile.TemporaryDirectory(prefix="edgefl-mosquitto-")
        self._choose_port = (fleet is None and not port) or (fleet is not None and any_port)
        self._started_once = False
        if fleet is not None:
            self.port = free_port() if any_port else fleet.port
            self.dir = fleet.path("broker")
        else:
            self.port = port or free_port()
            self.dir = Path(persistence_dir or self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_packet_size = max_packet_size
        self.process: subprocess.Popen | None = None
        self.log_path = self.dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.fleet is not None else 'mqtt'}://{self.host}:{self.port}"

    def _write_config(self) -> Path:
        # Started as root, mosquitto would drop to the "mosquitto" user, which cannot read our
        # keys or write our persistence directory: stay who we are.
        launcher = [f"user {getpass.getuser()}", "log_dest stderr", "log_type error",
                    "log_type warning", "log_type notice"]
        if self.fleet is not None:
            config = self.dir / "mosquitto.run.conf"
            text = mosquitto_config(self.fleet, bind=self.host, port=self.port,
                                    persistence=self.persistence,
                                    autosave_interval=self.autosave_interval)
            config.write_text(text + "\n".join(launcher + [f"pid_file {self.fleet.pid_file}", ""]))
            return config
        config = self.dir / "mosquitto.conf"
        config.write_text("\n".join([
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"max_packet_size {self.max_packet_size}",
            # Devices may be offline for hours: keep their queued QoS 1 messages.
            "max_queued_messages 10000",
            # Without it, Nagle's algorithm holds small packets (receipts, round
            # announcements) for up to ~40 ms.
            "set_tcp_nodelay true",
            *launcher, "",
        ]))
        return config

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        """Start Mosquitto and wait until it listens.

        Raises
        ------
        BrokerUnavailable
            Mosquitto is missing, the port is taken, or it did not start (its log says why).
        """
        attempts = 5 if self._choose_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._start(timeout)
                self._started_once = True
                return self
            except _PortTaken:
                if attempt + 1 == attempts:
                    raise
                self.port = free_port()  # another process took it meanwhile: pick again
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise BrokerUnavailable(MOSQUITTO_MISSING)
        if _listening(self.host, self.port):
            raise _PortTaken(
                f"port {self.port} on {self.host} is already in use: choose another port "
                "or pass --broker to use the broker that listens there"
            )
        config = self._write_config()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [exe, "-c", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                error = _PortTaken if "Address already in use" in tail[-200:] else BrokerUnavailable
                raise error(f"mosquitto exited with code {self.process.returncode}: {tail}")
            if _listening(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerUnavailable(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        """Stop the broker gracefully (it saves retained messages and sessions)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL): what it had not saved yet is lost, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def reload(self) -> None:
        """SIGHUP: the broker re-reads its password and ACL files."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop, wait ``downtime`` seconds, start again on the same port with the same state."""
        self.stop()
        time.sleep(downtime)
        self.start()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

