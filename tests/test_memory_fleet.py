"""The in-memory fleet runs the code a federation over MQTT runs: same model, round by round."""

import numpy as np
import pytest

from edgefl.device.client import EdgeClient
from edgefl.simulation.datasets import dirichlet_partition, load_digits
from edgefl.simulation.memory_fleet import MemoryFleet, central_training
from edgefl.wire.protocol import TrainingConfig
from edgefl_server.accounting import CentralPrivacy, RunAccountant
from edgefl_server.aggregator import AggregationServer, ServerConfig
from edgefl_server.model_builder import build_mlp
from edgefl_server.store import ServerStore
from edgefl_server.strategies import DPFedAvg

pytestmark = pytest.mark.integration

TRAINING = TrainingConfig(epochs=2, batch_size=16, lr=0.1)
CLIP, Z, SEED = 0.5, 0.8, 3


def device_data(count=3):
    X, y, _, _ = load_digits(0)
    return [(X[p], y[p]) for p in dirichlet_partition(y, count, alpha=0.5, seed=0)]


def test_central_dp_in_memory_gives_the_model_of_a_run_over_mosquitto(broker, tmp_path):
    data = device_data()
    initial = build_mlp((64, 32, 10), seed=0)
    central = CentralPrivacy(sampling_rate=1.0, clip=CLIP, noise_multiplier=Z)
    config = ServerConfig(broker_url=broker.url, fleet="mem", state_dir=tmp_path / "server",
                          rounds=2, min_clients=3, round_timeout=60.0, training=TRAINING,
                          central_privacy=central, strategy_options={"noise_seed": SEED},
                          insecure=True)  # the transport's part of the comparison only
    clients = []
    for i, (X, y) in enumerate(data):
        client = EdgeClient(f"dev-{i}", "mem", broker.url, tmp_path / f"dev-{i}", seed=0,
                            insecure=True)
        client.add_data(X, y)
        clients.append(client.start(timeout=10))
    try:
        history = AggregationServer(config, initial_model=initial).run()
    finally:
        for client in clients:
            client.stop()
    assert [r.accepted for r in history] == [3, 3]
    store = ServerStore(tmp_path / "server", fleet="mem", strategy="fedavg")
    published = store.load().model
    store.close()

    fleet = MemoryFleet(initial, data, strategy=DPFedAvg(clip=CLIP, noise_multiplier=Z,
                                                         noise_seed=SEED),
                        training=central_training(TRAINING, CLIP), sampling_rate=1.0,
                        accountant=RunAccountant(noise_multiplier=Z, sampling_rate=1.0,
                                                 delta=1e-5))
    for _ in range(2):
        assert fleet.run_round() == 3
    assert published.version == fleet.version == 2
    # Summation order differs (arrival order against device order): float32 rounding only.
    np.testing.assert_allclose(fleet.weights, published.weights, rtol=1e-5, atol=1e-6)
    assert fleet.accountant.epsilon() == pytest.approx(history[-1].privacy["epsilon"])
