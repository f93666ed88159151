"""Server metrics in the Prometheus text exposition format, served over HTTP by the stdlib.

``GET /metrics`` on ``metrics_port`` returns (names prefixed ``edgefl_server_``)::

    rounds_total                      counter  rounds closed (aggregated or model kept)
    round_id, model_version           gauge    where the server is
    devices_online                    gauge    devices whose retained status says "online"
    updates_accepted_total            counter  updates stored for aggregation
    updates_rejected_total{reason}    counter  rejected or dropped updates, by reason code
    uplink_bytes_total                counter  update payload bytes received
    downlink_bytes_total              counter  bytes the server published (models, rounds, receipts)
    aggregation_seconds               summary  from closing a round to its new model published

No third-party exporter is needed: the format is a few lines of text (see
https://prometheus.io/docs/instrumenting/exposition_formats/).
"""
from __future__ import annotations

import http.server
import threading
from collections import Counter

PREFIX = "edgefl_server_"


class ServerMetrics:
    """Counters and gauges of one server; updated from any thread, rendered on request."""

    def __init__(self):
        self._lock = threading.Lock()
        self.rounds = 0
        self.round_id = 0
        self.model_version = 0
        self.devices_online = 0
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.uplink_bytes = 0
        self.downlink_bytes = 0
        self.aggregation_count = 0
        self.aggregation_sum = 0.0

    def count_update(self, nbytes: int, rejected_reason: str | None = None) -> None:
        """One update message received; ``rejected_reason`` is its rejection code, if any."""
        with self._lock:
            self.uplink_bytes += nbytes
            if rejected_reason is None:
                self.accepted += 1
            else:
                self.rejected[rejected_reason] += 1

    def count_published(self, nbytes: int) -> None:
        with self._lock:
            self.downlink_bytes += nbytes

    def count_round(self, seconds: float, round_id: int, model_version: int) -> None:
        with self._lock:
            self.rounds += 1
            self.aggregation_count += 1
            self.aggregation_sum += seconds
            self.round_id, self.model_version = round_id, model_version

    def set_position(self, *, round_id: int, model_version: int) -> None:
        with self._lock:
            self.round_id, self.model_version = round_id, model_version

    def set_online(self, count: int) -> None:
        with self._lock:
            self.devices_online = count

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        with self._lock:
            lines = []

            def metric(name, kind, help_text, samples):
                lines.append(f"# HELP {PREFIX}{name} {help_text}")
                lines.append(f"# TYPE {PREFIX}{name} {kind}")
                for suffix, labels, value in samples:
                    lines.append(f"{PREFIX}{name}{suffix}{labels} {value}")

            metric("rounds_total", "counter", "Rounds closed.", [("", "", self.rounds)])
            metric("round_id", "gauge", "Current round id.", [("", "", self.round_id)])
            metric("model_version", "gauge", "Current global model version.",
                   [("", "", self.model_version)])
            metric("devices_online", "gauge", "Devices whose retained status is online.",
                   [("", "", self.devices_online)])
            metric("updates_accepted_total", "counter", "Updates stored for aggregation.",
                   [("", "", self.accepted)])
            metric("updates_rejected_total", "counter", "Updates rejected or dropped, by reason.",
                   [("", f'{{reason="{reason}"}}', n) for reason, n in sorted(self.rejected.items())])
            metric("uplink_bytes_total", "counter", "Update payload bytes received.",
                   [("", "", self.uplink_bytes)])
            metric("downlink_bytes_total", "counter", "Bytes published by the server.",
                   [("", "", self.downlink_bytes)])
            metric("aggregation_seconds", "summary",
                   "Time from closing a round to publishing its model.",
                   [("_count", "", self.aggregation_count),
                    ("_sum", "", repr(self.aggregation_sum))])
            return "\n".join(lines) + "\n"


class MetricsHttpServer:
    """``GET /metrics`` on a background thread (stdlib ``http.server``).

    Parameters
    ----------
    metrics : ServerMetrics
    port : int
        Port to listen on; 0 picks a free one (read :attr:`port` afterwards).
    host : str
        Interface; loopback by default, pass ``0.0.0.0`` for a Prometheus on another machine.
    """

    def __init__(self, metrics: ServerMetrics, port: int, host: str = "127.0.0.1"):
        render = metrics.render

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the log
                pass

        self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="edgefl-metrics", daemon=True)

    def start(self) -> "MetricsHttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
