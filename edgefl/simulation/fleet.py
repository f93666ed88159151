"""The simulated devices: real ``edgefl client`` processes, or in-process clients for quick runs,
and a wait until they are online."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgefl.device.client import EdgeClient
from edgefl.simulation.plan import SimulationPlan
from edgefl.simulation.task import Task
from edgefl.transport.mqtt import MqttConnection
from edgefl.trust.bundle import load_bundle
from edgefl.wire.protocol import DeviceStatus, ProtocolError, Topics


def device_id(i: int) -> str:
    """The id of simulated device ``i``."""
    return f"dev-{i:02d}"


class DeviceProcesses:
    """N device processes (``edgefl client`` with a prediction load, :mod:`edgefl.simulation.device_process`); :meth:`stop` ends every one of them (SIGTERM, then SIGKILL).

    With ``fleet`` (a provisioned fleet) each device runs from its bundle; without, insecure.
    """

    def __init__(self, plan: SimulationPlan, broker_url: str, workdir: Path, task: Task,
                 fleet=None):
        self.plan, self.broker_url, self.workdir, self.task = plan, broker_url, workdir, task
        self.fleet = fleet
        self.processes: list[subprocess.Popen] = []
        self.state_dirs: list[Path] = []

    def start(self) -> "DeviceProcesses":
        plan = self.plan
        data = self.task.part_files(self.workdir / "data")
        for i in range(len(data)):
            state = self.workdir / "devices" / device_id(i)
            state.mkdir(parents=True, exist_ok=True)
            connection = (["--bundle", str(self.fleet.bundle(device_id(i)))]
                          if self.fleet is not None else ["--insecure"])
            command = [
                sys.executable, "-m", "edgefl.simulation.device_process", *connection, "--broker",
                self.broker_url, "--fleet", plan.fleet, "--client-id", device_id(i),
                "--state-dir", str(state), "--data", str(data[i]), "--seed", str(plan.seed),
                "--privacy-budget", str(plan.privacy_budget),
                "--predict-rate", str(plan.predict_rate), "--exit-when-finished",
                "--log-level", "INFO",
            ]
            with open(state / "device.log", "ab") as log_file:
                self.processes.append(subprocess.Popen(
                    command, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            self.state_dirs.append(state)
        return self

    def wait(self, timeout: float) -> bool:
        """Wait until every device exited by itself; True if all did in time."""
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def failed(self) -> list[int]:
        """Indices of devices that exited with an error."""
        return [i for i, p in enumerate(self.processes) if p.poll() not in (None, 0)]


class DeviceThreads:
    """N in-process :class:`EdgeClient` objects (threads), the quick variant for benchmarks."""

    def __init__(self, plan: SimulationPlan, broker_url: str, workdir: Path, task: Task,
                 fleet=None):
        self.plan, self.broker_url, self.workdir, self.task = plan, broker_url, workdir, task
        self.fleet = fleet
        self.clients = []
        self.state_dirs: list[Path] = []

    def start(self) -> "DeviceThreads":
        task = self.task
        for i, part in enumerate(task.parts):
            state = self.workdir / "devices" / device_id(i)
            login = dict(insecure=True)
            if self.fleet is not None:
                bundle = load_bundle(self.fleet.bundle(device_id(i)))
                login = dict(username=bundle.username, password=bundle.password,
                             ca_certs=str(bundle.ca_certs), trust=bundle.trust_file)
            client = EdgeClient(device_id(i), self.plan.fleet, self.broker_url, state,
                                seed=self.plan.seed, privacy_budget=self.plan.privacy_budget,
                                **login)
            client.add_data(task.X_train[part], task.y_train[part])
            self.clients.append(client.start(timeout=30))
            self.state_dirs.append(state)
        return self

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(c.finished.wait(max(0.0, deadline - time.monotonic())) for c in self.clients)

    def stop(self) -> None:
        for client in self.clients:
            client.stop()
            client.write_stats()

    def failed(self) -> list[int]:
        return []


def wait_until_online(broker_url: str, fleet: str, count: int, timeout: float,
                      processes=None, login=None) -> None:
    """Block until ``count`` devices of ``fleet`` say "online" (retained status).

    ``login``: ``username``, ``password``, ``ca_certs`` of a principal allowed to read device
    status (a provisioned fleet's observer); anonymous without.
    """
    topics = Topics(fleet)
    online: set[str] = set()
    changed = threading.Event()

    def on_status(msg):
        client = topics.client_of(msg.topic)
        try:
            state = DeviceStatus.from_json(msg.payload).state if msg.payload else "offline"
        except ProtocolError:
            return
        (online.add if state == "online" else online.discard)(client)
        changed.set()

    login = login or {}
    watcher = MqttConnection(login.get("username", f"edgefl-sim-watch-{os.getpid()}"), broker_url,
                             session_expiry=0, subscriptions=[(topics.all_status, 1)],
                             on_message=on_status, **login)
    with watcher:
        deadline = time.monotonic() + timeout
        while len(online) < count:
            if processes is not None and processes.failed():
                raise RuntimeError(f"device(s) {processes.failed()} exited early; see their "
                                   "device.log in the output directory")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(online)} of {count} devices came online within "
                                   f"{timeout:g} s")
            changed.wait(0.2)
            changed.clear()

