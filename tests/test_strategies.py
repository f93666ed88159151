"""Strategy math against hand-computed values and a direct NumPy transcription of the papers."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.wire.protocol import TrainingConfig
from edgefl_server.strategies import (
    STRATEGIES, FedAdagrad, FedAdam, FedAvg, FedMedian, FedProx, FedSGD, FedTrimmedAvg, FedYogi,
    Krum, make_strategy,
)
from edgefl_server.strategies.aggregate import WeightedDelta, weighted_delta_sum


class Upd(NamedTuple):
    indices: np.ndarray | None
    values: np.ndarray
    num_samples: int


def dense(values, n):
    return Upd(None, np.asarray(values, np.float32), n)


def sparse(indices, values, n):
    return Upd(np.asarray(indices, np.uint32), np.asarray(values, np.float32), n)


def test_fedavg_weights_by_samples():
    w = np.array([1.0, 2.0], np.float32)
    new = FedAvg().aggregate(w, [dense([1.0, 0.0], 1), dense([0.0, 3.0], 3)])
    np.testing.assert_allclose(new, [1.25, 4.25])
    assert new.dtype == np.float32
    np.testing.assert_array_equal(w, [1.0, 2.0])  # the current model is not modified


def test_fedavg_sparse_hand_computed():
    w = np.zeros(5, np.float32)
    # coordinate 1: (2*1 + 0*3)/5; coordinate 3: (2*4 + 3*(-1))/5; coordinate 4: 3*2/5
    new = FedAvg().aggregate(w, [sparse([1, 3], [1.0, 4.0], 2), sparse([3, 4], [-1.0, 2.0], 3)])
    np.testing.assert_allclose(new, [0.0, 0.4, 0.0, 1.0, 1.2], rtol=1e-6)


def test_nothing_usable_keeps_the_model():
    w = np.ones(3, np.float32)
    for strategy in (FedAvg(), FedAdam(), FedYogi(), FedAdagrad(), FedProx(), FedSGD()):
        assert strategy.aggregate(w, []) is None
        assert strategy.aggregate(w, [dense([1, 1, 1], 0)]) is None
    adam = FedAdam()
    adam.aggregate(w, [])
    assert adam.state_dict() == {}  # an empty round does not start the optimizer


@st.composite
def sparse_round(draw):
    n = draw(st.integers(1, 40))
    clients = []
    for _ in range(draw(st.integers(1, 6))):
        idx = np.array(sorted(draw(st.sets(st.integers(0, n - 1), max_size=n))), np.uint32)
        vals = np.array(draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=idx.size,
                                      max_size=idx.size)), np.float32)
        clients.append(sparse(idx, vals, draw(st.integers(0, 1000))))
    return n, clients


@settings(max_examples=200, deadline=None)
@given(sparse_round())
def test_sparse_equals_dense(case):
    n, clients = case
    as_dense = []
    for c in clients:
        full = np.zeros(n, np.float32)
        full[c.indices] = c.values
        as_dense.append(dense(full, c.num_samples))
    w = np.linspace(-1, 1, n).astype(np.float32)
    a = FedAvg().aggregate(w, clients)
    b = FedAvg().aggregate(w, as_dense)
    if sum(c.num_samples for c in clients) == 0:
        assert a is None and b is None
        return
    np.testing.assert_array_equal(a, b)
    # and both equal the textbook formula
    total = sum(c.num_samples * d.values.astype(np.float64) for c, d in zip(clients, as_dense))
    expect = (w + total / sum(c.num_samples for c in clients)).astype(np.float32)
    np.testing.assert_allclose(a, expect, rtol=1e-5, atol=1e-4)


def test_mixed_sparse_and_dense():
    w = np.zeros(3, np.float32)
    new = FedAvg().aggregate(w, [dense([3.0, 3.0, 3.0], 1), sparse([2], [-3.0], 2)])
    np.testing.assert_allclose(new, [1.0, 1.0, -1.0])


def paper_fedopt(kind, x, deltas, *, eta, beta_1, beta_2, tau):
    """Reddi et al. 2021, Algorithm 2, written out line by line for several rounds."""
    m = np.zeros_like(x, dtype=np.float64)
    v = np.full_like(x, tau**2, dtype=np.float64)
    x = x.astype(np.float64)
    for d in deltas:
        m = beta_1 * m + (1 - beta_1) * d
        if kind == "adagrad":
            v = v + d * d
        elif kind == "yogi":
            v = v - (1 - beta_2) * d * d * np.sign(v - d * d)
        else:
            v = beta_2 * v + (1 - beta_2) * d * d
        x = x + eta * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("cls,kind", [(FedAdam, "adam"), (FedYogi, "yogi"), (FedAdagrad, "adagrad")])
def test_adaptive_optimizers_follow_the_paper(cls, kind):
    rng = np.random.default_rng(7)
    x0 = rng.normal(size=50).astype(np.float32)
    strategy = cls(eta=0.05, beta_1=0.9, beta_2=0.95, tau=1e-2)
    x = x0
    mean_deltas = []
    for _ in range(6):
        ups = [dense(rng.normal(scale=0.1, size=50), int(rng.integers(1, 50))) for _ in range(4)]
        n = sum(u.num_samples for u in ups)
        mean_deltas.append(sum(u.num_samples * u.values.astype(np.float64) for u in ups) / n)
        x = strategy.aggregate(x, ups)
    expect = paper_fedopt(kind, x0, mean_deltas, eta=0.05, beta_1=0.9, beta_2=0.95, tau=1e-2)
    np.testing.assert_allclose(x, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_optimizer_state_round_trips(cls):
    """A server restarted from saved m, v continues exactly where the old one was."""
    rng = np.random.default_rng(3)
    rounds = [[dense(rng.normal(size=8), 5), sparse([1, 6], rng.normal(size=2), 2)] for _ in range(4)]
    w = np.zeros(8, np.float32)
    straight = cls()
    for r in rounds:
        w = straight.aggregate(w, r)
    w2 = np.zeros(8, np.float32)
    first = cls()
    for r in rounds[:2]:
        w2 = first.aggregate(w2, r)
    saved = {k: v.copy() for k, v in first.state_dict().items()}
    resumed = cls()
    resumed.load_state_dict(saved)
    for r in rounds[2:]:
        w2 = resumed.aggregate(w2, r)
    np.testing.assert_array_equal(w, w2)


def test_fedopt_rejects_foreign_state():
    with pytest.raises(ValueError, match="another strategy"):
        FedAdam().load_state_dict({"x": np.zeros(2)})
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict({"m": np.zeros(2)})


def test_training_config_per_strategy():
    base = TrainingConfig(epochs=3, batch_size=16, lr=0.05, momentum=0.9)
    assert FedAvg().configure_training(base) == base
    assert FedProx(proximal_mu=0.3).configure_training(base) == dataclasses.replace(base, mu=0.3)
    sgd = FedSGD().configure_training(base)
    assert (sgd.epochs, sgd.momentum) == (1, 0.0) and sgd.batch_size >= 1 << 20
    TrainingConfig.from_dict(dataclasses.asdict(sgd))  # still a valid announcement
    assert FedAdam().configure_training(base).lr == 0.05
    assert FedAdam(eta_l=0.2).configure_training(base).lr == 0.2


def test_fedsgd_equals_one_large_batch_step():
    """Softmax-free check: for a linear least-squares model, the mean of the clients' one-step
    deltas (-lr * grad_k) weighted by n_k is -lr times the gradient on the pooled data."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=4)
    parts = [(rng.normal(size=(n, 4)), rng.normal(size=n)) for n in (3, 9, 5)]
    lr = 0.1
    ups = [dense(-lr * X.T @ (X @ w - y) / len(y), len(y)) for X, y in parts]
    Xall = np.vstack([X for X, _ in parts])
    yall = np.concatenate([y for _, y in parts])
    pooled = w - lr * Xall.T @ (Xall @ w - yall) / len(yall)
    np.testing.assert_allclose(FedSGD().aggregate(w.astype(np.float32), ups), pooled, rtol=1e-5)


def test_bad_options_and_names_are_explained():
    with pytest.raises(ValueError, match="no option 'mu'.*proximal_mu"):
        FedProx(mu=0.1)
    with pytest.raises(ValueError, match="fedadam.*beta_1.*1.5"):
        make_strategy("fedadam", {"beta_1": 1.5})
    with pytest.raises(ValueError, match="unknown strategy 'fedavgg'.*fedavg"):
        make_strategy("fedavgg")
    with pytest.raises(TypeError):
        FedAdam(0.1)  # keyword-only
    assert sorted(STRATEGIES) == ["fedadagrad", "fedadam", "fedavg", "fedmedian", "fedprox",
                                  "fedsgd", "fedtrimmedavg", "fedyogi", "krum"]


def test_weighted_sum_checks_its_inputs():
    with pytest.raises(ValueError, match="dense delta needs 3 values"):
        weighted_delta_sum([WeightedDelta(None, np.zeros(2, np.float32), 1.0)], 3)
    with pytest.raises(ValueError, match="index 3 is out of range"):
        weighted_delta_sum([WeightedDelta(np.array([3], np.uint32), np.ones(1, np.float32), 1.0)], 3)
    with pytest.raises(ValueError, match="weight must be finite"):
        weighted_delta_sum([WeightedDelta(None, np.zeros(3, np.float32), -1.0)], 3)


# -- robust rules ---------------------------------------------------------------------------------

def test_fedmedian_hand_computed_and_sparse_counts_zero():
    w = np.zeros(3, np.float32)
    ups = [dense([1.0, 5.0, -1.0], 1), dense([2.0, -5.0, 0.0], 100), sparse([0], [9.0], 1)]
    # per coordinate: median(1, 2, 9) = 2, median(5, -5, 0) = 0, median(-1, 0, 0) = 0
    np.testing.assert_array_equal(FedMedian().aggregate(w, ups), [2.0, 0.0, 0.0])


def test_trimmed_mean_drops_the_extremes():
    w = np.ones(2, np.float32)
    ups = [dense([v, -v], 1) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    # beta 0.2 of 5 clients trims one at each end: mean(2, 3, 4) = 3
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.2).aggregate(w, ups), [4.0, -2.0])
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.0).aggregate(w, ups), [203.0, -201.0])
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.4).aggregate(w, ups), [4.0, -2.0])  # median
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.4).aggregate(w, ups[:2]), [2.5, -0.5])  # 0 cut
    with pytest.raises(ValueError, match="beta must be a number in \\[0.0, 0.5\\)"):
        FedTrimmedAvg(beta=0.5)


def test_krum_discards_an_outlier():
    rng = np.random.default_rng(1)
    honest = [dense(rng.normal(0.0, 0.01, 20) + 0.1, 10) for _ in range(6)]
    attacker = dense(np.full(20, 50.0), 10_000)  # far away, and claims many samples
    w = np.zeros(20, np.float32)
    ups = honest + [attacker]
    one = Krum(num_malicious_clients=1).aggregate(w, ups)
    assert any(np.array_equal(one, u.values) for u in honest)
    multi = Krum(num_malicious_clients=1, num_clients_to_keep=6).aggregate(w, ups)
    np.testing.assert_allclose(multi, np.mean([u.values for u in honest], axis=0), rtol=1e-5)
    assert FedAvg().aggregate(w, ups).mean() > 40  # what the attacker does to plain FedAvg
    # n <= 2f + 2: the guarantee does not hold, keep the model
    assert Krum(num_malicious_clients=3).aggregate(w, ups) is None


@settings(max_examples=50, deadline=None)
@given(sparse_round())
def test_krum_scores_match_a_direct_transcription(case):
    n, clients = case
    from edgefl_server.strategies.aggregate import krum_select, stack_dense
    matrix = stack_dense([WeightedDelta(c.indices, c.values, 1.0) for c in clients], n)
    m = len(clients)
    f = max(0, (m - 3) // 2)
    if m <= 2 * f + 2:
        return
    scores = []
    for i in range(m):
        d = sorted(float(np.sum((matrix[i].astype(np.float64) - matrix[j]) ** 2))
                   for j in range(m) if j != i)
        scores.append(sum(d[: m - f - 2]))
    best = int(krum_select(matrix, f)[0])
    assert scores[best] == pytest.approx(min(scores), rel=1e-6, abs=1e-6)
