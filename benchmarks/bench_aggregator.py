"""Aggregator ingestion throughput against a bare paho subscriber, over one real Mosquitto.

One open round with ``--devices`` selected devices (distinct ids); every device sends one update
of the 64-256-256-10 MLP (85,002 parameters) at 1% density with float16 values (about 2.6 kB),
published at QoS 1 by ``--publishers`` processes as fast as they can. Two receivers take turns,
alternating in the same run, for the same payloads:

* **raw**: a bare paho-mqtt subscriber process (MQTT v5, QoS 1, paho acknowledges on receipt)
  that only counts messages: what the broker and a Python MQTT client can move here;
* **server**: the aggregator in its own process (``--ingest-workers`` 1, 2 or 3), from a fresh
  state directory: every update decoded, validated, stored durably (group commit) and
  acknowledged before the round closes with all devices answered.

Both rates are ``devices / (end - start)``: start when the publishers are told to go; end when
the raw subscriber counted the last message, or when the server's round thread decided to close
the round (every update stored). Each configuration is run ``--trials`` times; reported are
medians of both rates and the median of the per-trial ratios (server / the raw trial just
before). ``/proc/loadavg`` is recorded before every trial: on a shared machine a figure taken
under load says little about the product.

Writes ``benchmarks/results/aggregator.json``. Run: ``python benchmarks/bench_aggregator.py``
(defaults: 4,000 devices, 3 publishers, 5 trials); ``--devices 500 --trials 1`` for a quick check.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefl.wire import Update, encode_update
from edgefl.wire.protocol import DeviceStatus, Topics
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.mosquitto import MosquittoBroker

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


def _client(client_id: str, broker_port: int, *, clean: bool, subscribe: str | None = None,
            on_message=None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
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
    client.connect("127.0.0.1", broker_port, clean_start=clean, properties=props)
    client.loop_start()
    if not ready.wait(30):
        raise TimeoutError(f"{client_id} could not connect to the broker")
    return client


def _stop(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def forget_session(client_id: str, broker_port: int) -> None:
    """End a persistent session so the broker stops queueing updates for a finished receiver."""
    _stop(_client(client_id, broker_port, clean=True))


# -- processes --------------------------------------------------------------------------------

def publisher(broker_port: int, index: int, names: list[str], commands, done) -> None:
    """Encode one update per device once, then publish them all at QoS 1 on every "go"."""

    topics = Topics(FLEET)
    num_params = _num_params()
    k = int(num_params * DENSITY)
    rng = np.random.default_rng([7, index])
    messages = []
    for i, name in enumerate(names):
        indices = np.sort(rng.choice(num_params, k, replace=False)).astype(np.uint32)
        values = rng.normal(0, 0.01, k).astype(np.float16).astype(np.float32)
        payload = encode_update(Update(name, 1, 0, 1000 + i, 10 + i % 50, num_params, indices,
                                       values, "f16"))
        messages.append((topics.update(name), payload))
    client = _client(f"bench-publisher-{index}", broker_port, clean=True)
    done.put(("ready", index, len(messages[0][1])))
    while commands.get() == "go":
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(120)
        done.put(("published", index, time.time()))
    _stop(client)


def raw_subscriber(broker_port: int, expected: int, result) -> None:
    """Count ``expected`` update messages; report the time the last one arrived."""
    count = [0]
    finished = threading.Event()
    last = [0.0]

    def on_message(client, userdata, msg):
        count[0] += 1
        if count[0] == expected:
            last[0] = time.time()
            finished.set()

    client = _client("bench-raw", broker_port, clean=True,
                     subscribe=f"edgefl/{FLEET}/clients/+/update", on_message=on_message)
    result.put(("ready",))
    finished.wait(600)
    result.put(("done", last[0], count[0]))
    _stop(client)


def server_process(broker_url: str, state_dir: str, devices: int, workers: int, server_id: str,
                   result, profile: str | None) -> None:
    """Run one round of the aggregator; report when it decided to close (all updates stored)."""

    closed = threading.Event()
    outcome = {}

    def on_round(r):
        outcome.update(accepted=r.accepted, rejected=r.rejected,
                       decided=time.time() - r.aggregation_seconds)
        closed.set()

    options = {"ingest_workers": workers} if workers > 1 else {}
    config = ServerConfig(broker_url=broker_url, fleet=FLEET, state_dir=state_dir, rounds=1,
                          min_clients=devices, round_timeout=600.0, server_id=server_id,
                          insecure=True,  # the plain path: bench_trust.py measures trust's cost
                          **options)
    server = AggregationServer(config, initial_model=build_mlp(LAYERS, seed=0), on_round=on_round)
    server.start(timeout=60)
    while server.round.phase != "open":
        time.sleep(0.05)
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
    def __init__(self, ctx, broker_port: int, names: list[str], count: int):
        self.done = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(count)]
        self.procs = [ctx.Process(target=publisher,
                                  args=(broker_port, i, names[i::count], self.commands[i], self.done))
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


def publish_online(broker_port: int, names: list[str]) -> None:
    """Every device's retained "online" status, so the round selects all of them."""

    topics = Topics(FLEET)
    client = _client("bench-status", broker_port, clean=True)
    payload = DeviceStatus("online").to_json()
    infos = [client.publish(topics.status(n), payload, qos=1, retain=True) for n in names]
    for info in infos:
        info.wait_for_publish(120)
    _stop(client)


def trial_raw(ctx, broker, pubs, devices) -> dict:
    result = ctx.Queue()
    proc = ctx.Process(target=raw_subscriber, args=(broker.port, devices, result))
    proc.start()
    result.get(timeout=60)
    load = loadavg()
    meter = CpuMeter(receiver=[proc.pid], broker=[broker.process.pid],
                     publishers=[p.pid for p in pubs.procs]).start()
    start = pubs.go()
    pubs.wait()
    _, last, count = result.get(timeout=900)
    cpu = meter.stop()
    proc.join(30)
    if count != devices:
        raise RuntimeError(f"the raw subscriber counted {count} of {devices} updates")
    return {"updates_per_s": devices / (last - start), "seconds": last - start, "loadavg": load,
            "cpu_us_per_update": {k: v / devices * 1e6 for k, v in cpu.items()}}


def trial_server(ctx, broker, pubs, devices, workers, n, profile=None) -> dict:
    result = ctx.Queue()
    server_id = f"bench-server-{n}"
    with tempfile.TemporaryDirectory() as state:
        proc = ctx.Process(target=server_process,
                           args=(broker.url, state, devices, workers, server_id, result,
                                 profile and f"{profile}/server-w{workers}-{n}.txt"))
        proc.start()
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
    for suffix in ["", *(f".w{i}" for i in range(workers))]:
        forget_session(server_id + suffix, broker.port)
    if accepted != devices:
        raise RuntimeError(f"the server accepted {accepted} of {devices} updates ({rejected})")
    return {"updates_per_s": devices / (decided - start), "seconds": decided - start,
            "loadavg": load, "cpu_us_per_update": {k: v / devices * 1e6 for k, v in cpu.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4000)
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--workers", default="1,2,3",
                        help="comma-separated ingest worker counts to measure")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--profile", metavar="DIR",
                        help="record a py-spy GIL profile of every server trial into DIR "
                             "(collapsed stacks; it slows the server down)")
    args = parser.parse_args(argv)


    ctx = mp.get_context("spawn")
    names = [f"dev-{i:05d}" for i in range(args.devices)]
    worker_counts = [int(w) for w in args.workers.split(",")]
    rows = {w: [] for w in worker_counts}
    with MosquittoBroker() as broker:
        publish_online(broker.port, names)
        pubs = Publishers(ctx, broker.port, names, args.publishers)
        print(f"{args.devices} devices, {_num_params()} parameters at {DENSITY:.0%} density, f16: "
              f"{pubs.payload_bytes} B per update, {args.publishers} publisher processes, "
              f"{os.cpu_count()} CPUs", flush=True)
        try:
            n = 0
            for trial in range(args.trials):
                for w in worker_counts:  # raw and server alternate, same payloads
                    raw = trial_raw(ctx, broker, pubs, args.devices)
                    n += 1
                    server = trial_server(ctx, broker, pubs, args.devices, w, n, args.profile)
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
    summary = {}
    for w, trials in rows.items():
        summary[w] = {
            "server_updates_per_s": statistics.median(t["server"]["updates_per_s"] for t in trials),
            "raw_updates_per_s": statistics.median(t["raw"]["updates_per_s"] for t in trials),
            "ratio": statistics.median(t["ratio"] for t in trials),
            "loadavg_1min": [t["server"]["loadavg"][0] for t in trials] +
                            [t["raw"]["loadavg"][0] for t in trials],
        }
        s = summary[w]
        print(f"workers {w}: server {s['server_updates_per_s']:.0f} updates/s, raw "
              f"{s['raw_updates_per_s']:.0f} updates/s, ratio {s['ratio']:.2f} (medians of "
              f"{len(trials)}; 1-min load {min(s['loadavg_1min']):.2f}-"
              f"{max(s['loadavg_1min']):.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"devices": args.devices, "num_params": _num_params(), "density": DENSITY,
               "value_encoding": "f16", "payload_bytes": pubs.payload_bytes,
               "publishers": args.publishers, "cpus": os.cpu_count(),
               "python": platform.python_version(), "machine": platform.machine(),
               "workers": {str(w): {"trials": rows[w], **summary[w]} for w in worker_counts}}
    (out / "aggregator.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'aggregator.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
