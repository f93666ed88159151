"""Aggregation server benchmark: a round of many devices over a real Mosquitto.

For each round, pre-built updates of ``--devices`` devices (the 64-32-10 MLP, dense float32 or
sparse) are published as fast as a few raw paho connections can. Reported per mode (medians over
``--rounds`` rounds, plus min/max):

* **server close latency** (the issue's target, <= 50 ms): the server's
  ``last_update_to_model_seconds``, from the arrival of the round's last update at the server to
  the new model and the next announcement acknowledged by the broker (decode, validate, group
  commit, aggregation, the round's durable commit, publication);
  The last round of a run also waits for its receipts' PUBACK before announcing "finished"
  (devices may stop listening then), so its figure is higher; it is part of the medians;
* **end-to-end latency**: from the last update leaving its publisher's socket to the new model
  reaching a subscriber, measured in this process; on top of the above it contains the broker hops
  and the server's ingestion backlog at that instant;
* the server's ``aggregation_seconds`` (closing decision to model and announcement acknowledged);
* **ingestion throughput**: updates / (``last_receipt`` - first publish), every update decoded,
  validated and committed to SQLite (WAL, synchronous=FULL: one fsync per update) before its
  PUBACK and receipt.

Each mode runs against two Mosquitto configurations: the default, and ``set_tcp_nodelay true``.
With Nagle's algorithm on the broker's sockets (Mosquitto's default), a small packet sent right
after others (a PUBACK after a burst, a model right after a receipt) can wait for the peer's
delayed TCP ACK, about 40 ms on Linux. The server publishes models and announcements on a
connection of their own so that its burst of receipts does not delay them; the two
configurations show what remains of the effect.

Writes ``benchmarks/results/server.json``. Run: ``python benchmarks/bench_server.py`` (defaults:
100 devices, 7 rounds per mode); ``--rounds 2 --devices 20`` for a quick check.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import percentile  # noqa: E402

from edgefl.wire.protocol import DeviceStatus, RoundAnnouncement, Topics  # noqa: E402
from edgefl.wire import Update, decode_model, encode_update  # noqa: E402
from edgefl_server.aggregator import AggregationServer, ServerConfig  # noqa: E402
from edgefl_server.mosquitto import MosquittoBroker  # noqa: E402
from edgefl_server.model_builder import build_mlp  # noqa: E402

FLEET = "bench"
TOPICS = Topics(FLEET)
PUBLISHERS = 4


class NoDelayMosquitto(MosquittoBroker):
    """Mosquitto with ``set_tcp_nodelay true`` (Nagle's algorithm off on the broker's sockets)."""

    def _write_config(self):
        config = super()._write_config()
        config.write_text(config.read_text() + "set_tcp_nodelay true\n")
        return config


BROKERS = {"default": MosquittoBroker, "nodelay": NoDelayMosquitto}


class Watcher:
    """Subscriber that timestamps the round announcements, models and receipts it sees."""

    def __init__(self, broker):
        self.lock = threading.Condition()
        self.announcement: RoundAnnouncement | None = None
        self.model_times: dict[int, float] = {}
        self.receipts = 0
        self.last_receipt = 0.0
        self.client = _connect(broker, "bench-watcher",
                               [TOPICS.round, TOPICS.model, f"{TOPICS.prefix}/clients/+/receipt"])
        self.client.on_message = self._on_message

    def _on_message(self, client, userdata, msg):
        now = time.perf_counter()
        try:
            with self.lock:
                if msg.topic == TOPICS.round:
                    self.announcement = RoundAnnouncement.from_json(msg.payload)
                elif msg.topic == TOPICS.model:
                    self.model_times[decode_model(msg.payload).version] = now
                else:
                    self.receipts += 1
                    self.last_receipt = now
                self.lock.notify_all()
        except Exception:  # noqa: BLE001 - never raise into paho's network thread
            logging.exception("watcher")

    def wait(self, predicate, timeout=120.0):
        with self.lock:
            if not self.lock.wait_for(predicate, timeout):
                raise TimeoutError("the server did not get there in time")


def _connect(broker, client_id, topics=()):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    done = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: ([c.subscribe(t, 1) for t in topics], done.set())
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not done.wait(10):
        raise TimeoutError(f"{client_id} could not connect")
    time.sleep(0.1)
    return client


def build_payloads(devices, round_id, version, num_params, mode, rng):
    payloads = []
    for i, dev in enumerate(devices):
        if mode == "dense-f32":
            indices, values, encoding = None, rng.normal(0, 0.01, num_params), "f32"
        else:  # 10% of the coordinates, chosen at random, float16 values
            k = num_params // 10
            indices = np.sort(rng.choice(num_params, k, replace=False)).astype(np.uint32)
            values, encoding = rng.normal(0, 0.01, k).astype(np.float16), "f16"
        payloads.append((dev, encode_update(Update(dev, round_id, version, round_id, 50 + i,
                                                   num_params, indices,
                                                   np.asarray(values, np.float32), encoding))))
    return payloads


def run_mode(broker, mode, devices, rounds, state_dir, label):
    model = build_mlp((64, 32, 10), seed=0)
    names = [f"dev-{i:03d}" for i in range(devices)]
    config = ServerConfig(broker_url=broker.url, fleet=FLEET, state_dir=state_dir, rounds=rounds,
                          min_clients=devices, round_timeout=120.0,
                          server_id="bench-server",
                          # The plain path: this benchmark measures ingestion and publication,
                          # bench_trust.py what signing and sealing add to them.
                          insecure=True)
    watcher = Watcher(broker)
    publishers = [_connect(broker, f"bench-pub-{p}") for p in range(PUBLISHERS)]
    for i, name in enumerate(names):
        publishers[i % PUBLISHERS].publish(TOPICS.status(name), DeviceStatus("online").to_json(),
                                           qos=1, retain=True).wait_for_publish(10)
    server = AggregationServer(config, initial_model=model).start()
    rng = np.random.default_rng(0)
    rows = []
    try:
        for round_id in range(1, rounds + 1):
            watcher.wait(lambda: watcher.announcement is not None
                         and watcher.announcement.round_id == round_id
                         and watcher.announcement.state == "open")
            version = watcher.announcement.model_version
            payloads = build_payloads(names, round_id, version, model.manifest.num_params, mode, rng)
            with watcher.lock:
                receipts_before = watcher.receipts
            t_first = time.perf_counter()
            infos = [publishers[i % PUBLISHERS].publish(TOPICS.update(dev), data, qos=1)
                     for i, (dev, data) in enumerate(payloads)]
            last_sent = time.perf_counter()
            for info in infos:
                info.wait_for_publish(60)
            watcher.wait(lambda: version + 1 in watcher.model_times
                         and watcher.receipts - receipts_before >= devices
                         and len(server.history) >= round_id)
            result = server.history[-1]
            assert result.accepted == devices, result
            rows.append({
                "round": round_id,
                "close_latency_ms": result.last_update_to_model_seconds * 1e3,
                "end_to_end_ms": (watcher.model_times[version + 1] - last_sent) * 1e3,
                "aggregation_ms": result.aggregation_seconds * 1e3,
                "ingest_updates_per_s": devices / (watcher.last_receipt - t_first),
                "payload_bytes": int(np.mean([len(p) for _, p in payloads])),
                "publish_seconds": last_sent - t_first,
            })
            print(f"  {label:<22} round {round_id}: close {rows[-1]['close_latency_ms']:7.2f} ms  "
                  f"end-to-end {rows[-1]['end_to_end_ms']:7.2f} ms  "
                  f"aggregation {rows[-1]['aggregation_ms']:6.2f} ms  ingest "
                  f"{rows[-1]['ingest_updates_per_s']:7.0f} updates/s", flush=True)
    finally:
        server.stop()
        for c in [watcher.client, *publishers]:
            c.disconnect()
            c.loop_stop()
    return rows


def summarize(rows, key):
    values = [r[key] for r in rows]
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "p90": percentile(values, 90)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--modes", default="dense-f32,sparse10-f16")
    parser.add_argument("--brokers", default="default,nodelay",
                        help=f"Mosquitto configurations, from {sorted(BROKERS)}")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = {"devices": args.devices, "rounds": args.rounds, "model": "mlp 64-32-10",
               "python": platform.python_version(), "machine": platform.machine(),
               "target_close_latency_ms": 50.0, "modes": {}}
    for broker_name in args.brokers.split(","):
        with BROKERS[broker_name]() as broker, tempfile.TemporaryDirectory() as tmp:
            for mode in args.modes.split(","):
                label = f"{mode}/{broker_name}"
                rows = run_mode(broker, mode, args.devices, args.rounds, Path(tmp) / mode, label)
                summary = {key: summarize(rows, key) for key in
                           ("close_latency_ms", "end_to_end_ms", "aggregation_ms",
                            "ingest_updates_per_s")}
                results["modes"][label] = {"rounds": rows, **summary,
                                           "payload_bytes": rows[0]["payload_bytes"]}
                print(f"{label}: server close latency median "
                      f"{summary['close_latency_ms']['median']:.2f} ms (target <= 50), "
                      f"end-to-end median {summary['end_to_end_ms']['median']:.2f} ms, "
                      f"server aggregation median {summary['aggregation_ms']['median']:.2f} ms, "
                      f"ingestion median {summary['ingest_updates_per_s']['median']:.0f} "
                      f"updates/s, {rows[0]['payload_bytes']} B per update", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'server.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
