"""``edgefl server`` (edgefl.cli.server): clear errors for bad options and foreign state, the
fleet's Mosquitto when no --broker is given, options from the environment, the initial model."""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.cli import server
from edgefl.wire import encode_model
from edgefl.wire.protocol import DeviceStatus, Topics
from edgefl_server.model_builder import build_mlp
from edgefl_server.rounds import RoundState
from edgefl_server.store import ServerStore

DATA = Path(__file__).parent / "data"

FLEET = "demo"


def cli_args(*argv):
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    return server, parser.parse_args(list(argv))


def test_cli_explains_bad_options_and_foreign_state(secure_broker, fleet, tmp_path, capsys):
    broker = secure_broker
    base = ["--broker", broker.url, "--fleet", FLEET, "--state-dir", str(tmp_path / "state"),
            "--fleet-dir", str(fleet.directory)]
    cli, args = cli_args(*base, "--strategy", "fedadam", "--strategy-option", "beta1=0.9")
    assert cli.run(args) == 2
    assert "no option 'beta1'; its options are: eta, eta_l, beta_1" in capsys.readouterr().err
    cli, args = cli_args(*base, "--model", "mlp:64-x-10")
    assert cli.run(args) == 2
    assert "layer sizes must be integers" in capsys.readouterr().err
    ServerStore(tmp_path / "state", fleet=FLEET, strategy="fedavg").close()
    cli, args = cli_args(*base, "--strategy", "fedyogi")
    assert cli.run(args) == 2
    assert "pass --strategy fedavg to resume it" in capsys.readouterr().err
    cli, args = cli_args("--broker", broker.url, "--fleet", FLEET, "--state-dir", str(tmp_path))
    assert cli.run(args) == 2
    assert "give --fleet-dir DIR" in capsys.readouterr().err


def test_cli_embedded_broker_and_environment(fleet, tmp_path):
    """Without --broker the server starts Mosquitto with the fleet's configuration and says
    where; options come from EDGEFL_*."""
    env = {**os.environ, "EDGEFL_FLEET": FLEET, "EDGEFL_STATE_DIR": str(tmp_path / "state"),
           "EDGEFL_FLEET_DIR": str(fleet.directory), "EDGEFL_ROUNDS": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgefl", "server"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "started Mosquitto with the fleet's configuration at mqtts://127.0.0.1:" in line:
                break
        assert lines and "edgefl client --bundle DIR" in lines[-1], "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
        assert proc.returncode == 0, rest
        assert f"rerun with --state-dir {tmp_path / 'state'} to resume" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_initial_model_from_spec_or_file(tmp_path):
    model = build_mlp((8, 4, 3), seed=5)
    path = tmp_path / "model.bin"
    path.write_bytes(encode_model(model))
    loaded = server.load_initial_model(str(path), seed=0)
    assert loaded.manifest == model.manifest and loaded.onnx == model.onnx
    np.testing.assert_array_equal(loaded.weights, model.weights)
    assert server.load_initial_model("mlp:8-4-3", seed=5).manifest == model.manifest
    with pytest.raises(ValueError, match="neither mlp:SIZES nor an existing model file"):
        server.load_initial_model(str(tmp_path / "missing.bin"), seed=0)
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an ONNX model"):
        server.load_initial_model(str(path), seed=0)
    imported = server.load_initial_model(str(DATA / "torch_cnn.onnx"), seed=0, trainable_layers=1)
    assert imported.manifest.layer_sizes == (16, 10) and imported.version == 0


def test_an_unusable_onnx_model_is_refused_before_anything_starts(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args(["--fleet", "f", "--state-dir", str(tmp_path / "state"),
                              "--model", str(DATA / "torch_conv_tail.onnx")])
    assert server.run(args) == 2
    err = capsys.readouterr().err
    assert "torch_conv_tail.onnx" in err and "node 'node_conv2d' (Conv)" in err
    assert not (tmp_path / "state").exists()  # no embedded broker, no state directory


def test_metrics_stay_up_after_the_last_round_until_the_process_exits(broker, tmp_path):
    """--metrics-linger: the finished run's metrics can still be scraped; SIGTERM ends it."""
    peer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="status", protocol=mqtt.MQTTv5)
    peer.connect(broker.host, broker.port)
    peer.loop_start()
    peer.publish(Topics(FLEET).status("d1"), DeviceStatus("online").to_json(), qos=1,
                 retain=True).wait_for_publish(10)
    peer.disconnect()
    peer.loop_stop()
    # d1 is online but never answers: the round is extended once, then closes without quorum
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "server", "--insecure", "--broker", broker.url,
         "--fleet", FLEET,
         "--state-dir", str(tmp_path), "--rounds", "1", "--round-timeout", "0.5",
         "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--metrics-linger", "120"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        port, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            port = int(found.group(1)) if found else port
            if "serving the final metrics" in line:
                break
        assert port and "all 1 rounds done" in "".join(lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert "edgefl_server_rounds_total 1" in text
        assert 'edgefl_server_quorum_failures_total{outcome="extended"} 1' in text
        assert 'edgefl_server_quorum_failures_total{outcome="closed_without_quorum"} 1' in text
        assert "edgefl_server_round_stragglers 1" in text
        assert "edgefl_server_round_duration_seconds_count 1" in text
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_insecure_runs_only_when_asked_and_say_so(tmp_path):
    """--insecure starts an anonymous embedded broker and warns; the server's lines say so."""
    env = {**os.environ, "EDGEFL_FLEET": FLEET, "EDGEFL_STATE_DIR": str(tmp_path),
           "EDGEFL_ROUNDS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgefl", "server", "--insecure"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "INSECURE" in line:
                break
        text = "".join(lines)
        assert "WARNING" in lines[-1] and "without signatures or sealed updates" in lines[-1], text
        assert "started an embedded broker at mqtt://127.0.0.1:" in text
        assert "--insecure --broker" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_os_error_at_start_up_is_reported_and_stops_the_embedded_broker(tmp_path, capsys,
                                                                           monkeypatch):
    started = []

    class RecordedBroker(server.MosquittoBroker):
        def start(self, *a, **kw):
            super().start(*a, **kw)
            started.append(self.process)
            return self

    monkeypatch.setattr(server, "MosquittoBroker", RecordedBroker)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli, args = cli_args("--insecure", "--fleet", FLEET, "--state-dir", str(tmp_path),
                             "--metrics-port", str(port), "--rounds", "1")
        assert cli.run(args) == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in capsys.readouterr().err
    assert len(started) == 1 and started[0].poll() is not None  # not left running


@pytest.mark.parametrize("argv, message", [
    (["--state-dir", os.devnull + "/x"], os.devnull),
    (["--broker", "mqtts://127.0.0.1:1", "--ca-certs", "/nonexistent/ca.pem"],
     "/nonexistent/ca.pem"),
])
def test_unusable_paths_are_reported_without_a_traceback(tmp_path, capsys, argv, message):
    cli, args = cli_args("--insecure", "--broker", "mqtt://127.0.0.1:1", "--fleet", FLEET,
                         "--state-dir", str(tmp_path / "state"), *argv)
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgefl server: ") and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--metrics-port", "70000"], "must be a port in 0..65535"),
    (["--metrics-port", "-1"], "must be a port in 0..65535"),
    (["--compression", "topk", "--density", "2"], "must be a number in (0, 1]"),
    (["--compression", "topk", "--density", "0"], "must be a number in (0, 1]"),
    (["--compression", "threshold", "--tau", "-1"], "zero or a positive number"),
])
def test_out_of_range_numbers_get_argparses_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        server.main(["--fleet", FLEET, "--state-dir", str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_failed_first_start_does_not_fix_the_model_and_another_model_is_refused(
        broker, tmp_path, capsys):
    state = tmp_path / "state"
    cli, args = cli_args("--insecure", "--broker", "ftp://x", "--fleet", FLEET,
                         "--state-dir", str(state), "--model", "mlp:8-3")
    assert cli.run(args) == 2
    assert "ftp://x" in capsys.readouterr().err
    store = ServerStore(state, fleet=FLEET, strategy="fedavg")
    try:
        assert store.load() is None  # the failed start fixed no model
        store.initialize(build_mlp((8, 3), seed=0), RoundState(1, 0))
    finally:
        store.close()
    cli, args = cli_args("--insecure", "--broker", broker.url, "--fleet", FLEET,
                         "--state-dir", str(state), "--model", "mlp:8-4-3")
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert "already holds a different model" in err and "drop --model" in err, err


def test_sigterm_while_waiting_for_the_broker_stops_the_server(tmp_path):
    """Start-up waits up to 30 s for the broker; a SIGTERM ends that wait in a clean stop."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers there
        port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefl", "server", "--insecure", "--broker",
             f"mqtt://127.0.0.1:{port}", "--fleet", FLEET, "--state-dir", str(tmp_path)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if "INSECURE" in line:  # logged as start() begins, before it connects
                    break
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()
            assert proc.wait(60) == 0, "".join(lines) + rest
            assert "stopped during start-up" in rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
