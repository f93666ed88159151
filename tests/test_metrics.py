"""Prometheus text exposition of the server metrics, served over HTTP."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from edgefl_server.metrics import MetricsHttpServer, ServerMetrics


def test_metrics_text_and_http():
    m = ServerMetrics()
    m.count_update(100)
    m.count_update(40, "malformed")
    m.count_update(60, "late")
    m.count_update(10, "late")
    m.count_published(1234)
    m.set_online(7)
    m.count_round(0.25, round_id=2, model_version=1)
    server = MetricsHttpServer(m, 0).start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + "/other", timeout=5)
    finally:
        server.stop()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples == {
        "edgefl_server_rounds_total": "1", "edgefl_server_round_id": "2",
        "edgefl_server_model_version": "1", "edgefl_server_devices_online": "7",
        "edgefl_server_updates_accepted_total": "1",
        'edgefl_server_updates_rejected_total{reason="late"}': "2",
        'edgefl_server_updates_rejected_total{reason="malformed"}': "1",
        "edgefl_server_uplink_bytes_total": "210", "edgefl_server_downlink_bytes_total": "1234",
        "edgefl_server_aggregation_seconds_count": "1", "edgefl_server_aggregation_seconds_sum": "0.25",
    }
    assert "# TYPE edgefl_server_updates_rejected_total counter" in text
    assert "# TYPE edgefl_server_aggregation_seconds summary" in text
