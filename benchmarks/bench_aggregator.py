"""Aggregator ingestion throughput against a bare paho subscriber, over one real Mosquitto.

One open round with ``--devices`` selected devices (distinct ids); every device sends one update
of the 64-256-256-10 MLP (85,002 parameters) at 1% density with float16 values (about 2.6 kB),
published at QoS 1 by ``--publishers`` processes as fast as they can. Two receivers take turns,
alternating in the same run, for the same payloads:

* **raw**: a bare paho-mqtt subscriber process (MQTT v5, QoS 1, paho acknowledges on receipt)
  that only counts messages: what the broker and a Python MQTT client can move here;
* **server**: the aggregator in its own process (``--ingest-workers`` 1, 2 or 3), from a fresh
  state directory: every update opened, decoded, validated, stored durably (group commit),
  acknowledged and answered with a signed receipt before the round closes with all devices
  answered.

By default both run as deployed: a fleet provisioned by ``edgefl fleet init`` (Mosquitto's
generated configuration: TLS, logins, ACL), updates sealed to the server's key, receipts
signed; the benchmark adds logins of its own for its publishers (allowed to write every
device's update and status topic: one connection stands for many devices) and for the raw
subscriber (allowed to read updates). ``--insecure`` measures the plain path instead (no TLS,
no sealing, no signatures).

Both rates are ``devices / (end - start)``: start when the publishers are told to go; end when
the raw subscriber counted the last message, or when the server's round thread decided to close
the round (every update stored). Each configuration is run ``--trials`` times; reported are
medians of both rates and the median of the per-trial ratios (server / the raw trial just
before). ``/proc/loadavg`` is recorded before every trial: on a shared machine a figure taken
under load says little about the product. Each party's CPU time per update (the receiver with
its worker processes, Mosquitto, the publishers) is read from ``/proc`` for every trial: as the
load runs on the same machine as the server, the sum of the three bounds what the machine can
carry (printed as "carry at most"), and the receiver's share says what one more core would buy.

Writes ``benchmarks/results/aggregator.json`` (``aggregator-insecure.json``,
``aggregator-backlog.json`` for the other modes). Run: ``python benchmarks/bench_aggregator.py``
(defaults: 4,000 devices, 3 publishers, 5 trials); ``--devices 500 --trials 1`` for a quick check.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefl.trust import seal
from edgefl.wire import Update, encode_update
from edgefl.wire.protocol import DeviceStatus, Topics
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.mosquitto import MosquittoBroker, free_port
from edgefl_server.provisioning import (MAX_INGEST_WORKERS, hash_password, ingest_worker_principal,
                                        init_fleet, open_fleet, server_principal)

HERE = Path(__file__).resolve().parent

FLEET = "bench"
LAYERS = (64, 256, 256, 10)  # 85,002 parameters
DENSITY = 0.01


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages of the machine."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and of every live descendant (its workers)."""
    total, pending = 0.0, [pid]
    while pending:
        p = pending.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
            for task in Path(f"/proc/{p}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


class CpuMeter:
    """CPU seconds each party of a trial spent between :meth:`start` and :meth:`stop`."""

    def __init__(self, **pids: list[int]):
        self.pids = pids

    def start(self) -> "CpuMeter":
        self._t0 = {name: sum(map(cpu_seconds, pids)) for name, pids in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        return {name: sum(map(cpu_seconds, pids)) - self._t0[name]
                for name, pids in self.pids.items()}


@dataclass(frozen=True)
class Link:
    """How the benchmark's processes reach the broker: plain and anonymous, or the provisioned
    fleet's TLS listener with a login per client (the broker takes the login as client id)."""

    port: int
    fleet_dir: str | None = None  # None: plain MQTT (--insecure)
    passwords: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'mqtt' if self.fleet_dir is None else 'mqtts'}://127.0.0.1:{self.port}"


def provision(root: Path, publishers: int) -> tuple:
    """A fleet for the benchmark, plus logins for its load: ``(fleet, passwords)``.

    The publishers stand for many devices each, so their logins may write every device's
    update and status topics; the raw subscriber's may read the updates. Everything else is the
    configuration ``edgefl fleet init`` writes.
    """
    fleet, _ = init_fleet(root / "fleet", FLEET, port=free_port())
    server = fleet.server_credentials()
    passwords = {server_principal(FLEET): server["password"],
                 **{ingest_worker_principal(FLEET, i): server["password"]
                    for i in range(MAX_INGEST_WORKERS)}}
    rules = {f"bench-publisher-{i}": "write edgefl/bench/clients/+/update"
             for i in range(publishers)}
    rules.update({"bench-status": "write edgefl/bench/clients/+/status",
                  "bench-raw": "read edgefl/bench/clients/+/update"})
    with open(fleet.path("broker", "passwd"), "a") as passwd, \
            open(fleet.path("broker", "acl"), "a") as acl:
        for user, rule in rules.items():
            passwords[user] = f"bench-{user}-password"
            passwd.write(f"{user}:{hash_password(passwords[user])}\n")
            acl.write(f"\nuser {user}\ntopic {rule}\n")
    return fleet, passwords


def _client(client_id: str, link: Link, *, clean: bool, subscribe: str | None = None,
            on_message=None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    if link.fleet_dir is not None:
        client.tls_set(ca_certs=str(Path(link.fleet_dir, "ca", "ca.crt")))
        client.username_pw_set(client_id, link.passwords[client_id])
    client.max_inflight_messages_set(1000)
    ready = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        if subscribe is None:
            ready.set()
        else:
            c.subscribe(subscribe, 1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: ready.set()
    if on_message is not None:
        client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean else 3600
    client.connect("127.0.0.1", link.port, clean_start=clean, properties=props)
    client.loop_start()
    if not ready.wait(30):
        raise TimeoutError(f"{client_id} could not connect to the broker")
    return client


def _stop(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def forget_session(client_id: str, link: Link) -> None:
    """End a persistent session so the broker stops queueing updates for a finished receiver."""
    _stop(_client(client_id, link, clean=True))


# -- processes --------------------------------------------------------------------------------

def publisher(link: Link, index: int, names: list[str], commands, done) -> None:
    """Encode (and seal) one update per device once, then publish them all at QoS 1 on every
    "go"."""

    topics = Topics(FLEET)
    num_params = _num_params()
    k = int(num_params * DENSITY)
    rng = np.random.default_rng([7, index])
    sealing = None if link.fleet_dir is None else \
        open_fleet(link.fleet_dir).sealing_key().public_key()
    messages = []
    for i, name in enumerate(names):
        indices = np.sort(rng.choice(num_params, k, replace=False)).astype(np.uint32)
        values = rng.normal(0, 0.01, k).astype(np.float16).astype(np.float32)
        payload = encode_update(Update(name, 1, 0, 1000 + i, 10 + i % 50, num_params, indices,
                                       values, "f16"))
        if sealing is not None:
            payload = seal(payload, sealing, fleet=FLEET, client_id=name, round_id=1)
        messages.append((topics.update(name), payload))
    client = _client(f"bench-publisher-{index}", link, clean=True)
    done.put(("ready", index, len(messages[0][1])))
    while commands.get() == "go":
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(120)
        done.put(("published", index, time.time()))
    _stop(client)


def raw_subscriber(link: Link, expected: int, result, resume=None) -> None:
    """Count ``expected`` update messages; report the time the last one arrived.

    With ``resume`` (a queue), subscribe in a persistent session, leave, wait for the word and
    connect again: what was published meanwhile waits in the broker's session.
    """
    count = [0]
    finished = threading.Event()
    last = [0.0]

    def on_message(client, userdata, msg):
        count[0] += 1
        if count[0] == expected:
            last[0] = time.time()
            finished.set()

    topic = f"edgefl/{FLEET}/clients/+/update"
    if resume is None:
        client = _client("bench-raw", link, clean=True, subscribe=topic, on_message=on_message)
        result.put(("ready",))
    else:
        _stop(_client("bench-raw", link, clean=False, subscribe=topic))
        result.put(("ready",))
        resume.get()
        result.put(("starting", time.time()))
        client = _client("bench-raw", link, clean=False, subscribe=topic, on_message=on_message)
    finished.wait(600)
    result.put(("done", last[0], count[0]))
    _stop(client)
    if resume is not None:
        forget_session("bench-raw", link)


def server_process(link: Link, state_dir: str, devices: int, workers: int, server_id: str,
                   result, profile: str | None, resume=None) -> None:
    """Run one round of the aggregator; report when it decided to close (all updates stored).

    With ``resume`` (a queue), stop once the round is open, wait for the word, and start again
    on the same state: the updates published meanwhile wait in the broker's sessions.
    """

    closed = threading.Event()
    outcome = {}

    def on_round(r):
        outcome.update(accepted=r.accepted, rejected=r.rejected,
                       decided=time.time() - r.aggregation_seconds)
        closed.set()

    options = {"ingest_workers": workers} if workers > 1 else {}
    config = ServerConfig(broker_url=link.url, fleet=FLEET, state_dir=state_dir, rounds=1,
                          min_clients=devices, round_timeout=600.0, server_id=server_id,
                          insecure=link.fleet_dir is None, fleet_dir=link.fleet_dir, **options)
    server = AggregationServer(config, initial_model=build_mlp(LAYERS, seed=0), on_round=on_round)
    server.start(timeout=60)
    while server.round.phase != "open":
        time.sleep(0.05)
    if resume is not None:
        server.stop()  # its sessions stay: the broker queues the updates for them
        result.put(("stopped",))
        resume.get()
        server = AggregationServer(config, on_round=on_round)
        result.put(("starting", time.time()))
        server.start(timeout=60)
        result.put(("started", time.time()))
    spy = None
    if profile:  # GIL-holding samples only: where the server's one interpreter spends its time
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--gil",
                                "--format", "raw", "--rate", "250", "--pid", str(os.getpid()),
                                "--output", profile], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
    result.put(("open",))
    closed.wait(900)
    result.put(("closed",))  # the workers still run: the parent reads their CPU time now
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(30)
    server.stop()
    result.put(("done", outcome.get("decided", 0.0), outcome.get("accepted", 0),
                outcome.get("rejected", {})))


def _num_params() -> int:
    return sum(a * b + b for a, b in zip(LAYERS[:-1], LAYERS[1:]))


# -- the run ----------------------------------------------------------------------------------

class Publishers:
    def __init__(self, ctx, link: Link, names: list[str], count: int):
        self.done = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(count)]
        self.procs = [ctx.Process(target=publisher,
                                  args=(link, i, names[i::count], self.commands[i], self.done))
                      for i in range(count)]
        for p in self.procs:
            p.start()
        sizes = [self.done.get(timeout=600)[2] for _ in self.procs]
        self.payload_bytes = sizes[0]

    def go(self) -> float:
        start = time.time()
        for q in self.commands:
            q.put("go")
        return start

    def wait(self) -> float:
        return max(self.done.get(timeout=900)[2] for _ in self.procs)

    def close(self) -> None:
        for q in self.commands:
            q.put("stop")
        for p in self.procs:
            p.join(30)


def publish_online(link: Link, names: list[str]) -> None:
    """Every device's retained "online" status, so the round selects all of them."""

    topics = Topics(FLEET)
    client = _client("bench-status", link, clean=True)
    payload = DeviceStatus("online").to_json()
    infos = [client.publish(topics.status(n), payload, qos=1, retain=True) for n in names]
    for info in infos:
        info.wait_for_publish(120)
    _stop(client)


def trial_raw(ctx, broker, link, pubs, devices, backlog=False) -> dict:
    result, resume = ctx.Queue(), ctx.Queue() if backlog else None
    proc = ctx.Process(target=raw_subscriber, args=(link, devices, result, resume))
    proc.start()
    result.get(timeout=60)
    if backlog:
        pubs.go()
        pubs.wait()
    load = loadavg()
    meter = CpuMeter(receiver=[proc.pid], broker=[broker.process.pid],
                     publishers=[p.pid for p in pubs.procs]).start()
    if backlog:
        resume.put("go")
        start = result.get(timeout=60)[1]
    else:
        start = pubs.go()
        pubs.wait()
    _, last, count = result.get(timeout=900)
    cpu = meter.stop()
    proc.join(30)
    if count != devices:
        raise RuntimeError(f"the raw subscriber counted {count} of {devices} updates")
    return {"updates_per_s": devices / (last - start), "seconds": last - start, "loadavg": load,
            "cpu_us_per_update": {k: v / devices * 1e6 for k, v in cpu.items()}}


def trial_server(ctx, broker, link, pubs, devices, workers, n, profile=None,
                 backlog=False) -> dict:
    result, resume = ctx.Queue(), ctx.Queue() if backlog else None
    server_id = f"bench-server-{n}"
    startup = None
    with tempfile.TemporaryDirectory() as state:
        proc = ctx.Process(target=server_process,
                           args=(link, state, devices, workers, server_id, result,
                                 profile and f"{profile}/server-w{workers}-{n}.txt", resume))
        proc.start()
        if backlog:
            result.get(timeout=600)  # stopped, its round open
            pubs.go()
            pubs.wait()
            load = loadavg()
            meter = CpuMeter(receiver=[proc.pid], broker=[broker.process.pid],
                             publishers=[p.pid for p in pubs.procs]).start()
            resume.put("go")
            start = result.get(timeout=60)[1]
            startup = result.get(timeout=120)[1] - start
            result.get(timeout=600)  # open
        else:
            result.get(timeout=600)
            load = loadavg()
            meter = CpuMeter(receiver=[proc.pid], broker=[broker.process.pid],
                             publishers=[p.pid for p in pubs.procs]).start()
            start = pubs.go()
            pubs.wait()
        result.get(timeout=900)  # closed
        cpu = meter.stop()  # includes the round's close (aggregation): a few percent
        _, decided, accepted, rejected = result.get(timeout=900)
        proc.join(60)
    if link.fleet_dir is None:
        sessions = [server_id, *(f"{server_id}.w{i}" for i in range(workers))]
    else:  # the broker names sessions after the logins
        sessions = [server_principal(FLEET), *(ingest_worker_principal(FLEET, i)
                                               for i in range(workers))]
    for session in sessions:
        forget_session(session, link)
    if accepted != devices:
        raise RuntimeError(f"the server accepted {accepted} of {devices} updates ({rejected})")
    return {"updates_per_s": devices / (decided - start), "seconds": decided - start,
            "loadavg": load, "cpu_us_per_update": {k: v / devices * 1e6 for k, v in cpu.items()},
            **({} if startup is None else {"startup_seconds": startup})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4000)
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--workers", default="1,2,3",
                        help="comma-separated ingest worker counts to measure")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--insecure", action="store_true",
                        help="the plain path: no TLS, sealing or signatures (default: a "
                             "provisioned fleet, as deployed)")
    parser.add_argument("--backlog", action="store_true",
                        help="publish every update while the receiver is away, then time how "
                             "fast it drains its broker sessions: the publishers do not share "
                             "the CPUs with it (at most 10,000 updates: Mosquitto's queue per "
                             "session)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record a py-spy GIL profile of every server trial into DIR "
                             "(collapsed stacks; it slows the server down)")
    args = parser.parse_args(argv)


    ctx = mp.get_context("spawn")
    names = [f"dev-{i:05d}" for i in range(args.devices)]
    worker_counts = [int(w) for w in args.workers.split(",")]
    rows = {w: [] for w in worker_counts}
    root = Path(tempfile.mkdtemp(prefix="edgefl-bench-aggregator-"))
    if args.insecure:
        broker = MosquittoBroker(persistence_dir=root / "broker")
    else:
        fleet, passwords = provision(root, args.publishers)
        broker = MosquittoBroker(fleet=fleet, any_port=True)
    transport = "insecure (plain MQTT)" if args.insecure else \
        "provisioned (TLS, logins, ACL, sealed updates, signed receipts)"
    with broker:
        link = Link(broker.port) if args.insecure else \
            Link(broker.port, str(fleet.directory), passwords)
        publish_online(link, names)
        pubs = Publishers(ctx, link, names, args.publishers)
        print(f"{args.devices} devices, {_num_params()} parameters at {DENSITY:.0%} density, f16: "
              f"{pubs.payload_bytes} B per update, {args.publishers} publisher processes, "
              f"{os.cpu_count()} CPUs, {transport}", flush=True)
        try:
            n = 0
            for trial in range(args.trials):
                for w in worker_counts:  # raw and server alternate, same payloads
                    raw = trial_raw(ctx, broker, link, pubs, args.devices, args.backlog)
                    n += 1
                    server = trial_server(ctx, broker, link, pubs, args.devices, w, n,
                                          args.profile, args.backlog)
                    ratio = server["updates_per_s"] / raw["updates_per_s"]
                    rows[w].append({"raw": raw, "server": server, "ratio": ratio})
                    print(f"  trial {trial + 1} workers {w}: server {server['updates_per_s']:7.0f}"
                          f" updates/s  raw {raw['updates_per_s']:7.0f} updates/s  ratio "
                          f"{ratio:.2f}  load {' '.join(map(str, server['loadavg']))}", flush=True)
                    for name, t in (("server", server), ("raw", raw)):
                        print(f"    CPU us per update, {name} trial: " + ", ".join(
                            f"{k} {v:.0f}" for k, v in t["cpu_us_per_update"].items()), flush=True)
        finally:
            pubs.close()
    shutil.rmtree(root, ignore_errors=True)
    summary = {}
    for w, trials in rows.items():
        summary[w] = {
            "server_updates_per_s": statistics.median(t["server"]["updates_per_s"] for t in trials),
            "raw_updates_per_s": statistics.median(t["raw"]["updates_per_s"] for t in trials),
            "ratio": statistics.median(t["ratio"] for t in trials),
            "loadavg_1min": [t["server"]["loadavg"][0] for t in trials] +
                            [t["raw"]["loadavg"][0] for t in trials],
            "cpu_us_per_update": {
                kind: {party: statistics.median(t[kind]["cpu_us_per_update"][party]
                                                for t in trials)
                       for party in ("receiver", "broker", "publishers")}
                for kind in ("server", "raw")},
        }
        s = summary[w]
        cpu = s["cpu_us_per_update"]["server"]
        # Every party runs on this machine: their CPU time per update bounds the rate it can carry.
        s["cpu_bound_updates_per_s"] = os.cpu_count() * 1e6 / sum(cpu.values())
        print(f"workers {w}: server {s['server_updates_per_s']:.0f} updates/s, raw "
              f"{s['raw_updates_per_s']:.0f} updates/s, ratio {s['ratio']:.2f} (medians of "
              f"{len(trials)}; 1-min load {min(s['loadavg_1min']):.2f}-"
              f"{max(s['loadavg_1min']):.2f})\n"
              f"  CPU per update: server {cpu['receiver']:.0f} us (bare paho "
              f"{s['cpu_us_per_update']['raw']['receiver']:.0f} us), broker {cpu['broker']:.0f} "
              f"us, publishers {cpu['publishers']:.0f} us: {os.cpu_count()} CPUs carry at most "
              f"{s['cpu_bound_updates_per_s']:.0f} updates/s of this load", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"devices": args.devices, "num_params": _num_params(), "density": DENSITY,
               "value_encoding": "f16", "payload_bytes": pubs.payload_bytes,
               "publishers": args.publishers, "cpus": os.cpu_count(),
               "transport": "insecure" if args.insecure else "provisioned",
               "load": "backlog" if args.backlog else "live",
               "python": platform.python_version(), "machine": platform.machine(),
               "workers": {str(w): {"trials": rows[w], **summary[w]} for w in worker_counts}}
    path = out / ("aggregator" + "-insecure" * args.insecure + "-backlog" * args.backlog + ".json")
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
