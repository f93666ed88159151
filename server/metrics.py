"""Server metrics in the Prometheus text exposition format, served over HTTP by the stdlib.

``GET /metrics`` on ``metrics_port`` returns (names prefixed ``edgefl_server_``)::

    build_info{version,python,kernels}   gauge    1, labelled with what runs
    broker_connected                     gauge    1 while both MQTT connections are up
    rounds_total                         counter  rounds closed (aggregated or model kept)
    round_id, model_version              gauge    where the server is
    round_open                           gauge    1 while a round is open
    round_opened_timestamp_seconds       gauge    Unix time the open round opened (0 if none)
    round_deadline_timestamp_seconds     gauge    its deadline (moves once when extended)
    round_duration_seconds               summary  rounds from opening to closing
    devices_online                       gauge    devices whose retained status says "online"
    devices_selected                     gauge    devices selected for the current round
    round_stragglers                     gauge    selected devices without an update, last round
    stragglers_total                     counter  the same, summed over rounds
    quorum_failures_total{outcome}       counter  deadlines reached without quorum: "extended"
                                                  (once per round), "closed_without_quorum"
    updates_accepted_total               counter  updates stored for aggregation
    updates_rejected_total{reason}       counter  rejected or dropped updates, by reason code
    updates_bounded_total{reason}        counter  accepted updates capped or clipped
                                                  (samples_capped, norm_clipped; influence.py)
    ingest_backlog                       gauge    update messages received, not yet judged
    ingest_worker_restarts_total         counter  ingestion worker processes restarted
    uplink_bytes_total                   counter  update payload bytes received
    downlink_bytes_total                 counter  bytes the server published (models, rounds, receipts)
    aggregation_seconds                  summary  from closing a round to its new model published
    model_evaluation{metric}             gauge    the last model's evaluation (e.g. accuracy)
    devices_privacy_exhausted            gauge    online devices whose status reports no local
                                                  privacy budget left (they stop training)
    devices_privacy_remaining_min        gauge    the smallest remaining local budget (epsilon)
                                                  an online device reports
    privacy_epsilon, privacy_delta       gauge    the run's privacy so far, as the server accounts
                                                  it: central DP, (epsilon, delta) for one
                                                  device's data (user-level, add/remove, RDP);
                                                  local DP, the most replace-one epsilon (and
                                                  delta) a device spent, basic composition

The privacy gauges come from what devices report in their retained status
(``privacy_remaining``, epsilon left of their own budget; see ``docs/protocol.md``): they tell an
operator when a fleet is about to stop contributing, and are only as true as the devices.

No third-party exporter is needed: the format is a few lines of text (see
https://prometheus.io/docs/instrumenting/exposition_formats/).
"""
from __future__ import annotations

import http.server
import platform
import threading
from collections import Counter
from typing import Callable

import edgefl
from edgefl import kernels

PREFIX = "edgefl_server_"


def _label(value: str) -> str:
    """A label value escaped as the exposition format requires."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    """Counters and gauges of one server; updated from any thread, rendered on request.

    Parameters
    ----------
    build : dict, optional
        Labels of ``build_info`` (by default the edgefl version, Python and kernel backend).
    """

    def __init__(self, build: dict[str, str] | None = None):
        self._lock = threading.Lock()
        if build is None:
            build = {"version": edgefl.__version__, "python": platform.python_version(),
                     "kernels": kernels.BACKEND}
        self.build = dict(build)
        self.rounds = 0
        self.round_id = 0
        self.model_version = 0
        self.round_open = False
        self.round_opened_at = 0.0
        self.round_deadline = 0.0
        self.duration_count = 0
        self.duration_sum = 0.0
        self.devices_online = 0
        self.devices_selected = 0
        self.last_stragglers = 0
        self.stragglers = 0
        self.quorum_failures: Counter[str] = Counter()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.bounded: Counter[str] = Counter()
        self.uplink_bytes = 0
        self.downlink_bytes = 0
        self.aggregation_count = 0
        self.aggregation_sum = 0.0
        self.evaluation: dict[str, float] = {}
        self.worker_restarts = 0
        # Read at each scrape, from the server's own state (set by the server):
        #: update messages waiting to be judged;
        self.backlog: Callable[[], int] = lambda: 0
        #: whether the MQTT connections are up;
        self.connected: Callable[[], bool] = lambda: False
        #: the local privacy budgets (epsilon left) online devices report.
        self.privacy_left: Callable[[], list[float]] = list
        self.privacy_epsilon = 0.0
        self.privacy_delta = 0.0

    def count_update(self, nbytes: int, rejected_reason: str | None = None) -> None:
        """One update message received; ``rejected_reason`` is its rejection code, if any."""
        with self._lock:
            self.uplink_bytes += nbytes
            if rejected_reason is None:
                self.accepted += 1
            else:
                self.rejected[rejected_reason] += 1

    def count_updates(self, accepted: int, rejected: dict[str, int], nbytes: int) -> None:
        """A batch of update messages judged elsewhere (by an ingestion worker)."""
        with self._lock:
            self.uplink_bytes += nbytes
            self.accepted += accepted
            self.rejected.update(rejected)

    def count_worker_restart(self) -> None:
        with self._lock:
            self.worker_restarts += 1

    def count_bounded(self, reasons) -> None:
        """An accepted update was capped or clipped for each reason code in ``reasons``."""
        with self._lock:
            self.bounded.update(reasons)

    def count_published(self, nbytes: int) -> None:
        with self._lock:
            self.downlink_bytes += nbytes

    def round_opened(self, *, round_id: int, selected: int, opened_at: float,
                     deadline: float) -> None:
        """A round opened with ``selected`` devices (also called again on a resumed open round)."""
        with self._lock:
            self.round_id, self.devices_selected = round_id, selected
            self.round_open, self.round_opened_at, self.round_deadline = True, opened_at, deadline

    def round_extended(self, deadline: float) -> None:
        """The deadline passed without quorum and was extended once."""
        with self._lock:
            self.quorum_failures["extended"] += 1
            self.round_deadline = deadline

    def count_round(self, seconds: float, round_id: int, model_version: int, *,
                    duration: float | None = None, stragglers: int = 0,
                    quorum: bool = True) -> None:
        """A round closed: ``seconds`` of aggregation, ``duration`` from opening to closing,
        ``stragglers`` selected devices without an update; ``quorum`` False if it closed
        without one. ``round_id`` and ``model_version`` are where the server is now."""
        with self._lock:
            self.rounds += 1
            self.aggregation_count += 1
            self.aggregation_sum += seconds
            if duration is not None:
                self.duration_count += 1
                self.duration_sum += duration
            self.last_stragglers = stragglers
            self.stragglers += stragglers
            if not quorum:
                self.quorum_failures["closed_without_quorum"] += 1
            self.round_id, self.model_version = round_id, model_version
            self.round_open, self.round_opened_at, self.round_deadline = False, 0.0, 0.0

    def set_evaluation(self, values: dict[str, float]) -> None:
        """The newest model's evaluation (e.g. ``{"accuracy": 0.93}``)."""
        with self._lock:
            self.evaluation = {str(k): float(v) for k, v in values.items()}

    def set_position(self, *, round_id: int, model_version: int) -> None:
        with self._lock:
            self.round_id, self.model_version = round_id, model_version

    def set_privacy(self, epsilon: float, delta: float) -> None:
        with self._lock:
            self.privacy_epsilon, self.privacy_delta = epsilon, delta

    def set_online(self, count: int) -> None:
        with self._lock:
            self.devices_online = count

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        backlog, connected, privacy_left = _read(self.backlog, 0), _read(self.connected, False), \
            _read(self.privacy_left, [])
        exhausted = sum(1 for e in privacy_left if e <= 0)
        with self._lock:
            lines = []

            def metric(name, kind, help_text, samples):
                lines.append(f"# HELP {PREFIX}{name} {help_text}")
                lines.append(f"# TYPE {PREFIX}{name} {kind}")
                for suffix, labels, value in samples:
                    lines.append(f"{PREFIX}{name}{suffix}{labels} {value}")

            def one(name, kind, help_text, value):
                metric(name, kind, help_text, [("", "", value)])

            build = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(self.build.items()))
            metric("build_info", "gauge", "The running edgefl build.", [("", f"{{{build}}}", 1)])
            one("broker_connected", "gauge", "1 while the server's MQTT connections are up.",
                int(bool(connected)))
            one("rounds_total", "counter", "Rounds closed.", self.rounds)
            one("round_id", "gauge", "Current round id.", self.round_id)
            one("model_version", "gauge", "Current global model version.", self.model_version)
            one("round_open", "gauge", "1 while a round is open.", int(self.round_open))
            one("round_opened_timestamp_seconds", "gauge",
                "Unix time the open round opened (0 if none is open).", repr(self.round_opened_at))
            one("round_deadline_timestamp_seconds", "gauge",
                "Deadline of the open round (0 if none is open).", repr(self.round_deadline))
            metric("round_duration_seconds", "summary", "Rounds from opening to closing.",
                   [("_count", "", self.duration_count), ("_sum", "", repr(self.duration_sum))])
            one("devices_online", "gauge", "Devices whose retained status is online.",
                self.devices_online)
            one("devices_selected", "gauge", "Devices selected for the current round.",
                self.devices_selected)
            one("round_stragglers", "gauge",
                "Selected devices without an accepted update in the last closed round.",
                self.last_stragglers)
            one("stragglers_total", "counter", "Selected devices without an accepted update, "
                "summed over closed rounds.", self.stragglers)
            metric("quorum_failures_total", "counter",
                   "Deadlines reached without quorum, by what followed.",
                   [("", f'{{outcome="{o}"}}', self.quorum_failures[o])
                    for o in ("closed_without_quorum", "extended")])
            one("updates_accepted_total", "counter", "Updates stored for aggregation.",
                self.accepted)
            one("ingest_worker_restarts_total", "counter",
                "Ingestion worker processes restarted after they died.", self.worker_restarts)
            metric("updates_rejected_total", "counter", "Updates rejected or dropped, by reason.",
                   [("", f'{{reason="{_label(r)}"}}', n) for r, n in sorted(self.rejected.items())])
            metric("updates_bounded_total", "counter",
                   "Accepted updates whose sample count was capped or norm clipped, by reason.",
                   [("", f'{{reason="{_label(r)}"}}', n) for r, n in sorted(self.bounded.items())])
            one("ingest_backlog", "gauge", "Update messages received and not yet judged.",
                backlog)
            one("uplink_bytes_total", "counter", "Update payload bytes received.",
                self.uplink_bytes)
            one("downlink_bytes_total", "counter", "Bytes published by the server.",
                self.downlink_bytes)
            metric("aggregation_seconds", "summary",
                   "Time from closing a round to publishing its model.",
                   [("_count", "", self.aggregation_count),
                    ("_sum", "", repr(self.aggregation_sum))])
            metric("model_evaluation", "gauge", "Evaluation of the current model, by metric.",
                   [("", f'{{metric="{_label(k)}"}}', repr(v))
                    for k, v in sorted(self.evaluation.items())])
            one("devices_privacy_exhausted", "gauge",
                "Online devices reporting no local privacy budget left.", exhausted)
            if privacy_left:
                one("devices_privacy_remaining_min", "gauge",
                    "Smallest local privacy budget (epsilon) left that an online device reports.",
                    repr(float(min(privacy_left))))
            metric("privacy_epsilon", "gauge",
                   "Epsilon spent so far (central: user-level add/remove, RDP; local: the most a "
                   "device spent, replace-one, basic composition).",
                   [("", "", repr(self.privacy_epsilon))])
            metric("privacy_delta", "gauge", "Delta of privacy_epsilon.",
                   [("", "", repr(self.privacy_delta))])
            return "\n".join(lines) + "\n"


def _read(source, default):
    try:
        return source()
    except Exception:  # noqa: BLE001 - a scrape must not fail for one gauge
        return default


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

        try:
            self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # "Address already in use" alone does not say which address
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: "
                                     f"{exc.strerror or exc}") from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        # shutdown() waits for serve_forever's next poll: 0.05 s, not the default 0.5
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="edgefl-metrics", daemon=True)

    def start(self) -> "MetricsHttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
