"""The edgefl command: subcommands, --help, options from the environment, clear errors, and one
real device process driven only by environment variables."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefl.cli import bench, main
from edgefl.cli.client import apply_bundle, load_client_data
from edgefl.wire import encode_model
from edgefl.wire.protocol import RoundAnnouncement, Topics
from edgefl_server.model_builder import build_mlp

CLIENT_ENV = ("EDGEFL_BROKER", "EDGEFL_FLEET", "EDGEFL_CLIENT_ID", "EDGEFL_STATE_DIR",
              "EDGEFL_PRIVACY_BUDGET", "EDGEFL_DATA", "EDGEFL_TLS", "EDGEFL_EXIT_WHEN_FINISHED",
              "EDGEFL_BUNDLE", "EDGEFL_TRUST", "EDGEFL_INSECURE", "EDGEFL_FLEET_DIR")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)


def parse_client(argv):
    return main.build_parser().parse_args(["client", *argv])


def test_python_m_edgefl_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "edgefl", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for command in ("client", "server", "simulate", "bench", "fleet"):
        assert command in result.stdout


@pytest.mark.parametrize("command, expected", [
    ("client", "--state-dir"),
    ("server", "--round-timeout"),
    ("simulate", "--devices"),
    ("bench", "--sizes"),
    ("fleet", "add-device"),
])
def test_every_subcommand_has_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert expected in out
    if command != "bench":
        assert "[env EDGEFL_" in out  # every option names its environment variable


def test_client_options_come_from_the_environment_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("EDGEFL_BROKER", "mqtt://gateway:1884")
    monkeypatch.setenv("EDGEFL_FLEET", "plant-7")
    monkeypatch.setenv("EDGEFL_CLIENT_ID", "press-3")
    monkeypatch.setenv("EDGEFL_STATE_DIR", "/var/lib/edgefl")
    monkeypatch.setenv("EDGEFL_DATA", "/var/lib/edgefl/local.npz")
    monkeypatch.setenv("EDGEFL_PRIVACY_BUDGET", "12.5")
    monkeypatch.setenv("EDGEFL_TLS", "yes")
    args = parse_client(["--client-id", "press-4"])
    assert (args.broker, args.fleet, args.client_id, args.state_dir, args.data) == (
        "mqtt://gateway:1884", "plant-7", "press-4", "/var/lib/edgefl", "/var/lib/edgefl/local.npz")
    assert args.privacy_budget == 12.5 and args.tls is True


def test_missing_required_options_are_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_client(["--broker", "mqtt://h:1"])
    assert exit_info.value.code == 2
    assert "--state-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        apply_bundle(parse_client(["--broker", "mqtt://h:1", "--state-dir", "s", "--data", "d"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--bundle" in err and "--fleet" in err and "--client-id" in err and "--trust" in err


CLIENT_BASE = ["--broker", "mqtt://h:1", "--fleet", "f", "--client-id", "c", "--state-dir", "s",
               "--data", "d.npz"]


def test_a_bundle_fills_the_connection_options_and_the_command_line_wins(fleet):
    args = parse_client(["--bundle", str(fleet.bundle("dev-1")), "--state-dir", "s",
                         "--data", "d.npz", "--broker", "mqtts://elsewhere:8883"])
    apply_bundle(args)
    assert (args.fleet, args.client_id, args.username) == ("demo", "dev-1", "dev-1")
    assert args.broker == "mqtts://elsewhere:8883"
    assert args.password == (fleet.bundle("dev-1") / "password").read_text()
    assert args.trust == str(fleet.bundle("dev-1") / "trust.json")


def test_a_revoked_bundle_is_refused_with_what_to_do(fleet, capsys):
    from edgefl_server.provisioning import revoke_device

    revoke_device(fleet.directory, "dev-2")
    with pytest.raises(SystemExit) as exit_info:
        apply_bundle(parse_client(["--bundle", str(fleet.bundle("dev-2")), "--state-dir", "s",
                                   "--data", "d.npz"]))
    assert exit_info.value.code == 2
    assert "revoked device needs a new one" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--connect-timeout", "-1"], "positive number"),
    (["--privacy-budget", "0"], "positive number"),
    (["--capacity", "many"], "invalid int value"),
])
def test_bad_values_get_clear_errors(argv, message, capsys):
    base = CLIENT_BASE
    with pytest.raises(SystemExit):
        parse_client(base + argv)
    assert message in capsys.readouterr().err


def test_a_bad_environment_value_is_reported_like_a_bad_option(monkeypatch, capsys):
    monkeypatch.setenv("EDGEFL_PRIVACY_BUDGET", "lots")
    with pytest.raises(SystemExit):
        parse_client(CLIENT_BASE)
    assert "--privacy-budget" in capsys.readouterr().err


def test_the_device_command_has_no_simulation_options(capsys):
    """Demo data and the prediction load belong to the simulation (edgefl.simulation)."""
    for flag in ("--dataset", "--partition", "--alpha", "--predict-rate"):
        with pytest.raises(SystemExit):
            parse_client(CLIENT_BASE + [flag, "1"])
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_data_from_an_npz_file(tmp_path):
    path = tmp_path / "local.npz"
    np.savez(path, X=np.ones((4, 64)), y=np.arange(4))
    samples = load_client_data(str(path))
    X, y = samples.X, samples.y
    assert X.dtype == np.float32 and X.shape == (4, 64) and list(y) == [0, 1, 2, 3]


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, X=np.ones((2, 64))), "missing ['y']"),
    (lambda p: p.write_bytes(b"not a zip"), "cannot read"),
    (lambda p: None, "does not exist"),
])
def test_unreadable_data_files_are_explained(tmp_path, make, message):
    path = tmp_path / "local.npz"
    make(path)
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_client_data(str(path))


def test_a_csv_file_with_a_named_label_column_and_a_bad_row(tmp_path, caplog):
    path = tmp_path / "local.csv"
    path.write_text("a,b,kind\n0.5,1,2\n0.1,oops,1\n1,2,0\n")
    samples = load_client_data(str(path), label_column="kind")
    assert samples.X.tolist() == [[0.5, 1.0], [1.0, 2.0]] and samples.y.tolist() == [2, 0]
    assert samples.lines.tolist() == [2, 4]
    assert "line 3: not a number" in caplog.text


def test_a_data_file_without_the_label_column_says_which_flag_names_it(tmp_path):
    path = tmp_path / "local.csv"
    path.write_text("a,b,target\n0.5,1,2\n")
    with pytest.raises(SystemExit, match="no label column 'label'.*--label-column"):
        load_client_data(str(path))


def test_bench_outside_a_source_checkout_says_where_the_benchmarks_are(tmp_path, capsys):
    assert bench.run_bench([], benchmarks_dir=tmp_path) == 2
    assert "benchmarks ship with edgefl's source" in capsys.readouterr().err


def test_client_exits_with_a_clear_error_when_the_broker_is_unreachable(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        np.savez(tmp_path / "d.npz", X=np.ones((3, 64)), y=np.zeros(3, np.int64))
        result = subprocess.run(
            [sys.executable, "-m", "edgefl", "client", "--insecure",
             "--broker", f"mqtt://127.0.0.1:{port}",
             "--fleet", "f", "--client-id", "dev", "--state-dir", str(tmp_path / "state"),
             "--data", str(tmp_path / "d.npz"), "--connect-timeout", "1"],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"could not connect to the MQTT broker at mqtt://127.0.0.1:{port}" in result.stderr


def _bundle_env(fleet, device):
    """The environment a service file gets from the bundle's device.env."""
    lines = (fleet.bundle(device) / "device.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line)


@pytest.mark.integration
def test_a_device_with_a_wrong_password_exits_at_once_naming_the_cause(secure_broker, fleet,
                                                                        tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 64)), y=np.zeros(3, np.int64))
    env = {**os.environ, **_bundle_env(fleet, "dev-1"), "EDGEFL_PASSWORD": "wrong",
           "EDGEFL_BROKER": secure_broker.url,
           "EDGEFL_STATE_DIR": str(tmp_path / "state"), "EDGEFL_DATA": str(tmp_path / "d.npz")}
    env.pop("EDGEFL_BUNDLE")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "edgefl", "client", "--connect-timeout", "120"],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert "refused the login of 'dev-1'" in result.stderr
    assert "not authorized" in result.stderr.lower() or "bad user name" in result.stderr.lower()
    assert time.monotonic() - started < 100  # not after the whole connect timeout


@pytest.mark.integration
def test_a_device_configured_only_by_environment_serves_and_exits_when_finished(
        secure_broker, fleet, tmp_path):
    """A real `edgefl client` process: its bundle's device.env, a signed retained model,
    predictions, a signed "finished" -> exit."""
    from edgefl.trust import Signer

    model = build_mlp((64, 32, 10), seed=0).with_weights(
        build_mlp((64, 32, 10), seed=1).weights, version=3, round_id=3)
    topics = Topics("demo")
    signer = Signer(fleet.signing_key(), "demo")
    creds = fleet.server_credentials()
    online = threading.Event()
    peer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds["control_username"],
                       protocol=mqtt.MQTTv5)
    peer.tls_set(ca_certs=str(fleet.ca_cert))
    peer.username_pw_set(creds["control_username"], creds["password"])
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds["username"],
                          protocol=mqtt.MQTTv5)
    watcher.tls_set(ca_certs=str(fleet.ca_cert))
    watcher.username_pw_set(creds["username"], creds["password"])
    watcher.on_connect = lambda c, *a: c.subscribe(topics.status("dev-1"), 1)
    watcher.on_message = lambda c, u, msg: b'"online"' in msg.payload and online.set()
    for c in (peer, watcher):
        c.connect(secure_broker.host, secure_broker.port)
        c.loop_start()
    peer.publish(topics.model, signer.sign("model", encode_model(model)), qos=1,
                 retain=True).wait_for_publish(5)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.random((20, 64)), y=rng.integers(0, 10, 20))
    env = {**os.environ, **_bundle_env(fleet, "dev-1"), "EDGEFL_STATE_DIR": str(tmp_path / "state"),
           "EDGEFL_BROKER": secure_broker.url, "EDGEFL_DATA": str(tmp_path / "d.npz"),
           "EDGEFL_EXIT_WHEN_FINISHED": "1"}
    env.pop("EDGEFL_BUNDLE")  # the variables alone carry everything
    device = subprocess.Popen([sys.executable, "-m", "edgefl", "client"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert online.wait(30), "the device did not come online"
        peer.publish(topics.round, signer.sign("round", RoundAnnouncement(
            3, 3, time.time(), state="finished").to_json()), qos=1, retain=True).wait_for_publish(5)
        _, stderr = device.communicate(timeout=30)
    finally:
        device.kill()
        for c in (peer, watcher):
            c.disconnect()
            c.loop_stop()
    assert device.returncode == 0, stderr
    stats = json.loads((tmp_path / "state" / "stats.json").read_text())
    assert stats["model_version"] == 3 and stats["client_id"] == "dev-1"


@pytest.mark.integration
def test_simulate_runs_a_small_federation_and_writes_its_summary(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "simulate", "--devices", "3", "--rounds", "3",
         "--compression", "topk", "--density", "0.05", "--values", "f16", "--predict-rate", "100",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "round   3/3" in result.stdout and "accuracy per round" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["accuracy"]) == 3
    assert summary["devices_on_final_version"] == 3 and summary["final_model_version"] == 3
    assert len(summary["dense_fedavg"]["accuracy"]) == 3  # compressed run: the dense baseline ran
    assert len(summary["centralised"]["accuracy"]) == 3
    assert summary["bytes"]["uplink"] < summary["bytes"]["uplink_dense_float32"] / 5
    assert summary["predictions"]["served"] > 0 and summary["predictions"]["errors"] == 0
    assert summary["security"].startswith("provisioned: TLS") and "security: provisioned" in \
        result.stdout
    assert all(d["secure"] and d["refused_signature"] == 0 for d in summary["devices"])
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def digits_csv(path, *, label_shift=0, sites=True):
    """Digits as a user's CSV file: 64 pixel columns, a site column, the label in "digit"."""
    from sklearn.datasets import load_digits

    data = load_digits()
    site = np.array(["north", "south", "east"])[np.arange(len(data.target)) % 3]
    with open(path, "w") as f:
        f.write(",".join([f"p{i}" for i in range(64)] + ["site"] * sites + ["digit"]) + "\n")
        for x, s, label in zip(data.data / 16.0, site, data.target):
            f.write(",".join([f"{v:.4g}" for v in x] + [s] * sites + [str(label + label_shift)])
                    + "\n")
    return path


@pytest.mark.integration
def test_simulate_runs_a_users_onnx_model_on_a_users_csv(tmp_path):
    data = digits_csv(tmp_path / "digits.csv")
    out = tmp_path / "run"
    model = Path(__file__).parent / "data" / "torch_cnn.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "simulate", "--model", str(model),
         "--trainable-layers", "1", "--data", str(data), "--label-column", "digit",
         "--partition", "by-column:site", "--rounds", "2", "--lr", "0.01", "--predict-rate", "20",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "3 devices (processes)" in result.stdout and "by column 'site'" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "digits.csv, torch_cnn.onnx"
    assert summary["devices_on_final_version"] == 3 and summary["final_model_version"] == 2
    assert summary["bytes"]["num_params"] == 170  # the last layer, 16-10, trains
    # The pretrained CNN is good before any round (it was trained on digits), and stays good.
    assert summary["initial_accuracy"] > 0.8 and summary["final_accuracy"] > 0.8
    assert summary["predictions"]["served"] > 0 and summary["predictions"]["errors"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--label-column", "target"], "no label column 'target'"),
    (["--label-column", "digit", "--partition", "by-column:region"],
     "no column 'region' to partition by"),
])
def test_simulate_refuses_data_that_does_not_fit_before_starting(tmp_path, capsys, extra,
                                                                 message):
    data = digits_csv(tmp_path / "digits.csv")
    model = Path(__file__).parent / "data" / "sk_mlp.onnx"
    out = tmp_path / "run"
    assert main.main(["simulate", "--model", str(model), "--data", str(data), *extra,
                     "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing started


def test_simulate_refuses_labels_outside_the_models_classes(tmp_path, capsys):
    data = digits_csv(tmp_path / "digits.csv", label_shift=1, sites=False)  # labels 1..10
    model = Path(__file__).parent / "data" / "keras_mlp.onnx"
    assert main.main(["simulate", "--model", str(model), "--data", str(data), "--label-column",
                     "digit", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "labels [10] are outside the model's classes 0..9" in err
    assert "relabel the data" in err


def test_simulate_says_why_no_row_of_the_data_is_usable(tmp_path, capsys):
    data = digits_csv(tmp_path / "digits.csv")  # "site" is text: as a feature, no row is usable
    model = Path(__file__).parent / "data" / "keras_mlp.onnx"
    assert main.main(["simulate", "--model", str(model), "--data", str(data), "--label-column",
                     "digit", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "holds no usable sample" in err and "line 2: not a number" in err


@pytest.mark.integration
def test_simulate_with_central_dp_stops_at_its_target_and_reports_epsilon(tmp_path):
    out = tmp_path / "central"
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "simulate", "--devices", "3", "--rounds", "4",
         "--threads", "--privacy", "central", "--sampling-rate", "1", "--noise-multiplier", "3",
         "--target-epsilon", "2.3", "--target-delta", "1e-5", "--compression", "none",
         "--values", "f32", "--predict-rate", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["mode"] == "central" and privacy["delta"] == 1e-5
    # z = 3, q = 1: epsilon 1.39, 2.03, 2.54, ... after 1, 2, 3 rounds; the target 2.3 allows 2
    assert privacy["rounds"] == len(summary["accuracy"]) == 2
    assert privacy["epsilon"] == pytest.approx(2.029, abs=1e-3)
    assert [r["privacy"]["epsilon"] for r in summary["rounds"]] == sorted(
        r["privacy"]["epsilon"] for r in summary["rounds"])
    assert "privacy: epsilon" in result.stdout and "user-level, add/remove" in result.stdout
    # the devices learn that the run stopped early and finish on their own, none is stopped
    assert "did not finish" not in result.stderr + result.stdout
    assert "3 of 3 devices ended on the final model version 2" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--privacy", "central"], "--sampling-rate"),
    (["--privacy", "central", "--sampling-rate", "0.1"], "--noise-multiplier"),
    (["--privacy", "laplace", "--target-epsilon", "8"], "--target-epsilon belongs to --privacy central"),
    (["--privacy", "central", "--sampling-rate", "2", "--noise-multiplier", "1"], "sampling rate"),
])
def test_central_privacy_options_are_checked(tmp_path, argv, message, capsys):
    assert main.main(["simulate", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_simulate_rejects_bad_counts(tmp_path, capsys):
    assert main.main(["simulate", "--devices", "0", "--out", str(tmp_path)]) == 2
    assert "--devices and --rounds must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"--broker": "ftp://x"}, "ftp://x"),
    ({"--client-id": "bad id!"}, "bad id!"),
    ({"--fleet": "a/b"}, "a/b"),
    ({"--state-dir": os.devnull + "/x"}, os.devnull),
    ({"--broker": "mqtts://127.0.0.1:1", "--ca-certs": "/nonexistent/ca.pem"},
     "/nonexistent/ca.pem"),
])
def test_client_reports_bad_options_without_a_traceback(tmp_path, capsys, change, message):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 64)), y=np.zeros(3, np.int64))
    options = {"--broker": "mqtt://127.0.0.1:1", "--fleet": "f", "--client-id": "a",
               "--state-dir": str(tmp_path / "state"), "--data": str(tmp_path / "d.npz"),
               "--connect-timeout": "1", **change}
    argv = ["client", "--insecure"] + [part for item in options.items() for part in item]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgefl client: ") and message in err, err
