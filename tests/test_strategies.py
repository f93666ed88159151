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

def test_fedmedian_hand_computed_over_the_senders():
    w = np.zeros(3, np.float32)
    ups = [dense([1.0, 5.0, -1.0], 1), dense([2.0, -5.0, 0.0], 100), sparse([0], [9.0], 1)]
    # per coordinate over the clients that sent it: median(1, 2, 9) = 2, median(5, -5) = 0,
    # median(-1, 0) = -0.5 (the sparse client did not send coordinates 1 and 2)
    np.testing.assert_array_equal(FedMedian(min_senders=2).aggregate(w, ups), [2.0, 0.0, -0.5])
    # a coordinate fewer than min_senders clients sent stays put
    np.testing.assert_array_equal(FedMedian(min_senders=3).aggregate(w, ups), [2.0, 0.0, 0.0])


def per_coordinate(clients, n, rule, min_senders):
    """The documented rule written out coordinate by coordinate."""
    out = np.zeros(n, np.float64)
    needed = max(1, min(min_senders, len(clients)))
    for j in range(n):
        sent = [float(c.values[list(c.indices).index(j)]) if c.indices is not None
                else float(c.values[j]) for c in clients
                if c.indices is None or j in set(c.indices.tolist())]
        if len(sent) >= needed:
            out[j] = rule(sorted(sent))
    return out


def textbook_trimmed(values, beta):
    cut = int(np.floor(beta * len(values)))
    return float(np.mean(np.asarray(values[cut:len(values) - cut], np.float64)))


@settings(max_examples=150, deadline=None)
@given(sparse_round(), st.integers(1, 4), st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.49]))
def test_coordinate_rules_match_a_per_coordinate_transcription(case, min_senders, beta):
    n, clients = case
    w = np.linspace(-1, 1, n).astype(np.float32)
    got = FedMedian(min_senders=min_senders).aggregate(w, clients) - w
    want = per_coordinate(clients, n, lambda v: float(np.median(np.asarray(v, np.float64))),
                          min_senders)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4)
    got = FedTrimmedAvg(beta=beta, min_senders=min_senders).aggregate(w, clients) - w
    want = per_coordinate(clients, n, lambda v: textbook_trimmed(v, beta), min_senders)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4)


def test_dense_rules_are_the_papers_rules():
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(7, 50)).astype(np.float32)
    w = np.zeros(50, np.float32)
    ups = [dense(row, 1) for row in matrix]
    np.testing.assert_allclose(FedMedian().aggregate(w, ups), np.median(matrix, axis=0), rtol=1e-6)
    ordered = np.sort(matrix, axis=0)
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.2).aggregate(w, ups),
                               ordered[1:6].mean(axis=0), rtol=1e-5, atol=1e-7)


def topk_round(rng, clients, n, density, signal):
    """Each client sends its top-k of a shared signal plus its own noise (top-k picks from data)."""
    k = int(density * n)
    ups = []
    for _ in range(clients):
        delta = (signal + rng.normal(0.0, 0.3 * np.abs(signal).mean(), n)).astype(np.float32)
        idx = np.sort(np.argsort(-np.abs(delta))[:k]).astype(np.uint32)
        ups.append(sparse(idx, delta[idx], 10))
    return ups


def test_robust_rules_do_not_freeze_under_topk():
    """The issue's measurement: top-k 10% of 10 clients froze FedMedian (0.0% of the coordinates
    moved) when a coordinate not sent counted as zero. Counting only the senders moves the
    coordinates the clients agree on, in the direction of the common signal."""
    rng = np.random.default_rng(0)
    n = 5000
    signal = rng.normal(0.0, 1.0, n).astype(np.float32)
    ups = topk_round(rng, 10, n, 0.1, signal)
    w = np.zeros(n, np.float32)
    fedavg_moved = FedAvg().aggregate(w, ups) != 0
    for strategy in (FedMedian(), FedTrimmedAvg(beta=0.2)):
        step = strategy.aggregate(w, ups)
        moved = step != 0
        assert moved.mean() > 0.5 * fedavg_moved.mean(), strategy
        # where it moves it follows the signal (a sign error would be an attacker's win)
        assert np.mean(np.sign(step[moved]) == np.sign(signal[moved])) > 0.95


def test_robust_strategies_warn_about_data_dependent_sparsification():
    from edgefl.wire.protocol import CompressionConfig
    for name in ("fedmedian", "fedtrimmedavg", "krum"):
        strategy = make_strategy(name)
        for method in ("topk", "threshold"):
            warning = strategy.compression_warning(CompressionConfig(method, density=0.1))
            assert warning is not None and method in warning and "randomk" in warning
        assert strategy.compression_warning(CompressionConfig("randomk", density=0.1)) is None
        assert strategy.compression_warning(CompressionConfig()) is None
    assert FedAvg().compression_warning(CompressionConfig("topk", density=0.1)) is None


def test_randomk_overlap_by_construction_keeps_every_client():
    """With random-k from the shared seed all clients send the same coordinates, so the median
    runs over every client there and a poisoned minority (20%, x10, sign-flipped) cannot move it
    the way it moves FedAvg."""
    from edgefl import kernels
    rng = np.random.default_rng(1)
    n, k = 2000, 200
    idx = kernels.randomk(n, k, 12345)
    honest = [rng.normal(0.5, 0.1, k).astype(np.float32) for _ in range(8)]
    poisoned = [-10.0 * h for h in honest[:2]]
    ups = [sparse(idx, v, 10) for v in honest + poisoned]
    w = np.zeros(n, np.float32)
    for strategy in (FedMedian(), FedTrimmedAvg(beta=0.2), Krum(num_malicious_clients=2)):
        step = strategy.aggregate(w, ups)[idx]
        assert np.all(step > 0.2), strategy  # honest direction and size kept
    assert np.all(FedAvg().aggregate(w, ups)[idx] < 0)  # FedAvg is dragged the other way


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
    from edgefl_server.strategies.aggregate import krum_select, stack_senders
    senders = stack_senders([WeightedDelta(c.indices, c.values, 1.0) for c in clients], n)
    matrix = senders.zero_filled()
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
