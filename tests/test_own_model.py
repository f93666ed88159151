"""A user's own exported model through the whole loop over a real Mosquitto: import, devices
fine-tune its head on their data, the server aggregates, the federated model is exported, and
plain onnxruntime on the export gives what the devices predict."""
import numpy as np
import pytest
from exported_models import DATA, EXPORTS, Original

from edgefl.device.client import EdgeClient
from edgefl.simulation.datasets import dirichlet_partition, load_digits
from edgefl.wire.protocol import TrainingConfig
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.onnx_export import export_onnx
from edgefl_server.onnx_import import import_onnx, load_model

pytestmark = pytest.mark.integration

ROUNDS = 2
DEVICES = 2
FLEET_DEVICES = tuple(f"dev-{i}" for i in range(DEVICES))


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_a_users_model_trains_over_mosquitto_and_exports(name, secure_broker, fleet, tmp_path):
    broker = secure_broker  # the provisioned configuration, as deployed
    model0 = import_onnx(DATA / f"{name}.onnx", trainable_layers=1 if name == "torch_cnn" else None)
    X_train, y_train, X_test, _ = load_digits(0)
    parts = dirichlet_partition(y_train, DEVICES, alpha=1.0, seed=0)
    config = ServerConfig(broker_url=broker.url, fleet=fleet.fleet, state_dir=tmp_path / "server",
                          rounds=ROUNDS, min_clients=DEVICES, round_timeout=60.0,
                          training=TrainingConfig(epochs=2, batch_size=16, lr=0.05), seed=0,
                          fleet_dir=fleet.directory)
    server = AggregationServer(config, initial_model=model0)
    clients = []
    for i in range(DEVICES):
        bundle = fleet.bundle(f"dev-{i}")
        clients.append(EdgeClient(f"dev-{i}", fleet.fleet, broker.url, tmp_path / f"dev-{i}",
                                  seed=i, username=f"dev-{i}",
                                  password=(bundle / "password").read_text(),
                                  ca_certs=str(bundle / "ca.crt"), trust=bundle / "trust.json"))
    for client, part in zip(clients, parts):
        client.add_data(X_train[part], y_train[part])
    server.start()
    try:
        for client in clients:
            client.start(timeout=20)
        assert server.wait(120), f"rounds done: {[r.round_id for r in server.history]}"
        for client in clients:
            assert client.finished.wait(30)
            assert client.model_version == ROUNDS
    finally:
        server.stop()
        for client in clients:
            client.stop()
    assert [r.accepted for r in server.history] == [DEVICES] * ROUNDS
    final = load_model(tmp_path / "server")  # the state directory, as `edgefl model export` reads it
    assert final.version == ROUNDS and not np.array_equal(final.weights, model0.weights)
    exported = Original(export_onnx(final))  # as the application runs it: plain onnxruntime
    np.testing.assert_allclose(exported.probabilities(X_test, EXPORTS[name][0]),
                               clients[0].predict(X_test), rtol=1e-5, atol=1e-6)
