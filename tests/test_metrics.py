"""Prometheus text exposition of the server metrics, served over HTTP."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from edgefl_server.metrics import MetricsHttpServer, ServerMetrics


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read().decode()


def samples_of(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def test_metrics_text_and_http():
    m = ServerMetrics(build={"version": "9.9", "python": "3.x", "kernels": "compiled"})
    m.count_update(100)
    m.count_update(40, "malformed")
    m.count_update(60, "late")
    m.count_update(10, "late")
    m.count_published(1234)
    m.set_online(7)
    m.connected = lambda: True
    m.round_opened(round_id=2, selected=5, opened_at=100.0, deadline=160.0)
    m.round_extended(220.0)
    m.backlog = lambda: 3
    m.privacy_left = lambda: [0.0, 3.5, -0.0]
    m.count_updates(2, {"late": 1}, 50)
    m.count_worker_restart()
    open_samples = samples_of(m.render())
    assert open_samples["edgefl_server_round_open"] == "1"
    assert open_samples["edgefl_server_round_opened_timestamp_seconds"] == "100.0"
    assert open_samples["edgefl_server_round_deadline_timestamp_seconds"] == "220.0"
    m.count_round(0.25, round_id=3, model_version=1, duration=130.5, stragglers=4, quorum=False)
    m.set_evaluation({"accuracy": 0.875})
    m.set_privacy(1.5, 1e-5)
    server = MetricsHttpServer(m, 0).start()
    try:
        text = scrape(server.port)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            scrape(server.port, "/other")
    finally:
        server.stop()
    assert samples_of(text) == {
        'edgefl_server_build_info{kernels="compiled",python="3.x",version="9.9"}': "1",
        "edgefl_server_broker_connected": "1",
        "edgefl_server_rounds_total": "1", "edgefl_server_round_id": "3",
        "edgefl_server_model_version": "1", "edgefl_server_round_open": "0",
        "edgefl_server_round_opened_timestamp_seconds": "0.0",
        "edgefl_server_round_deadline_timestamp_seconds": "0.0",
        "edgefl_server_round_duration_seconds_count": "1",
        "edgefl_server_round_duration_seconds_sum": "130.5",
        "edgefl_server_devices_online": "7", "edgefl_server_devices_selected": "5",
        "edgefl_server_round_stragglers": "4", "edgefl_server_stragglers_total": "4",
        'edgefl_server_quorum_failures_total{outcome="closed_without_quorum"}': "1",
        'edgefl_server_quorum_failures_total{outcome="extended"}': "1",
        "edgefl_server_updates_accepted_total": "3",
        "edgefl_server_ingest_worker_restarts_total": "1",
        'edgefl_server_updates_rejected_total{reason="late"}': "3",
        'edgefl_server_updates_rejected_total{reason="malformed"}': "1",
        "edgefl_server_ingest_backlog": "3",
        "edgefl_server_uplink_bytes_total": "260", "edgefl_server_downlink_bytes_total": "1234",
        "edgefl_server_aggregation_seconds_count": "1", "edgefl_server_aggregation_seconds_sum": "0.25",
        'edgefl_server_model_evaluation{metric="accuracy"}': "0.875",
        "edgefl_server_devices_privacy_exhausted": "2",
        "edgefl_server_devices_privacy_remaining_min": "0.0",
        "edgefl_server_privacy_epsilon": "1.5", "edgefl_server_privacy_delta": "1e-05",
    }
    assert "# TYPE edgefl_server_updates_rejected_total counter" in text
    assert "# TYPE edgefl_server_aggregation_seconds summary" in text
    assert "# TYPE edgefl_server_round_duration_seconds summary" in text


def test_default_build_info_names_the_running_edgefl():
    import edgefl
    from edgefl import kernels

    text = ServerMetrics().render()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("edgefl_server_build_info")]
    assert f'version="{edgefl.__version__}"' in line and f'kernels="{kernels.BACKEND}"' in line
    # no device reported a budget yet: no minimum is invented
    assert "devices_privacy_remaining_min" not in text


def test_label_values_are_escaped_and_a_failing_backlog_does_not_break_a_scrape():
    m = ServerMetrics(build={"version": 'a"b\\c\nd'})
    m.backlog = lambda: 1 / 0
    text = m.render()
    assert 'edgefl_server_build_info{version="a\\"b\\\\c\\nd"} 1' in text
    assert "edgefl_server_ingest_backlog 0" in text


def test_metrics_listen_on_the_given_host():
    server = MetricsHttpServer(ServerMetrics(), 0, host="127.0.0.2").start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{server.port}/metrics", timeout=5) as resp:
            assert b"edgefl_server_build_info" in resp.read()
        with pytest.raises(urllib.error.URLError):
            scrape(server.port)  # not on 127.0.0.1
    finally:
        server.stop()
