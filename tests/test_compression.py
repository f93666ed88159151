"""Sparsification with error feedback, random-k and value quantization."""
import numpy as np
import pytest

from edgefl import kernels
from edgefl.device.compression import VALUE_ENCODINGS, Compressor
from edgefl.wire.protocol import CompressionConfig

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.backend, pytest.mark.cpu]


def updates(n, rounds, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n).astype(np.float32) for _ in range(rounds)]


def test_none_sends_the_dense_update():
    x = updates(50, 1)[0]
    idx, vals = Compressor(CompressionConfig(), 50).sparsify(x)
    assert idx is None
    np.testing.assert_array_equal(vals, x)
    assert vals is not x


@pytest.mark.parametrize("values", VALUE_ENCODINGS)
@pytest.mark.parametrize("method, extra", [("topk", {"density": 0.05}),
                                           ("threshold", {"tau": 1.5})])
def test_error_feedback_loses_nothing_only_delays_it(method, extra, values):
    """After any number of rounds: everything sent + the residual == everything put in."""
    n = 400
    comp = Compressor(CompressionConfig(method=method, values=values, **extra), n)
    sent = np.zeros(n, np.float64)
    total = np.zeros(n, np.float64)
    for x in updates(n, 6):
        idx, vals = comp.sparsify(x)
        assert idx.dtype == np.uint32 and np.all(np.diff(idx.astype(np.int64)) > 0)
        np.add.at(sent, idx, vals)
        total += x
    np.testing.assert_allclose(sent + comp.residual, total, atol=1e-4)


def test_topk_keeps_k_coordinates_and_the_residual_persists_across_rounds():
    n = 1000
    comp = Compressor(CompressionConfig(method="topk", density=0.01), n)
    assert comp.k == 10 and comp.selects_from_data
    x = np.zeros(n, np.float32)
    x[:20] = np.arange(1, 21, dtype=np.float32)
    idx, vals = comp.sparsify(x)
    np.testing.assert_array_equal(idx, np.arange(10, 20))
    idx, vals = comp.sparsify(np.zeros(n, np.float32))  # next round: the held-back ten go out
    np.testing.assert_array_equal(idx, np.arange(10))
    np.testing.assert_array_equal(vals, np.arange(1, 11, dtype=np.float32))


def test_threshold_sends_what_moved_more_than_tau_once_it_has():
    comp = Compressor(CompressionConfig(method="threshold", tau=1.0), 4)
    step = np.array([0.6, 0.0, -2.0, 0.1], np.float32)
    idx, vals = comp.sparsify(step)
    np.testing.assert_array_equal(idx, [2])
    idx, vals = comp.sparsify(step)  # coordinate 0 has now moved 1.2 in total
    np.testing.assert_array_equal(idx, [0, 2])
    np.testing.assert_allclose(vals, [1.2, -2.0])


def test_randomk_is_data_independent_and_shared_by_seed():
    n = 10_000
    comp = Compressor(CompressionConfig(method="randomk", density=0.01), n)
    a, b = updates(n, 2)
    idx_a, vals_a = comp.sparsify(a, randomk_seed=42)
    idx_b, _ = Compressor(CompressionConfig(method="randomk", density=0.01), n).sparsify(
        b, randomk_seed=42)
    np.testing.assert_array_equal(idx_a, idx_b)
    np.testing.assert_array_equal(idx_a, kernels.randomk(n, 100, 42))
    np.testing.assert_array_equal(vals_a, a[idx_a])
    assert not np.array_equal(comp.sparsify(a, randomk_seed=43)[0], idx_a)
    assert comp.residual is None and not comp.selects_from_data
    with pytest.raises(ValueError, match="randomk_seed"):
        comp.sparsify(a)


@pytest.mark.parametrize("values", VALUE_ENCODINGS)
def test_values_are_rounded_to_their_encoding(values):
    x = updates(300, 1)[0]
    _, vals = Compressor(CompressionConfig(values=values), 300).sparsify(x)
    assert vals.dtype == np.float32
    if values == "f32":
        np.testing.assert_array_equal(vals, x)
    elif values == "f16":
        np.testing.assert_array_equal(vals, x.astype(np.float16).astype(np.float32))
    elif values == "int8":
        scale = np.abs(x).max() / 127
        np.testing.assert_allclose(vals, x, atol=scale / 2 + 1e-6)
    else:
        assert len(np.unique(np.abs(vals[vals != 0]))) == 1  # sign times one scale
        assert np.all(np.sign(vals[vals != 0]) == np.sign(x[vals != 0]))


def test_k_is_at_least_one_and_at_most_n():
    assert Compressor(CompressionConfig(method="topk", density=1e-9), 50).k == 1
    assert Compressor(CompressionConfig(method="randomk", density=1.0), 50).k == 50


@pytest.mark.parametrize("config, message", [
    (CompressionConfig(method="zip"), "unknown compression method"),
    (CompressionConfig(values="f8"), "unknown value encoding"),
    (CompressionConfig(method="topk", density=0.0), "density"),
    (CompressionConfig(method="threshold", tau=-1.0), "tau"),
])
def test_bad_compression_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        Compressor(config, 10)


def test_wrong_update_shape_is_refused():
    comp = Compressor(CompressionConfig(method="topk", density=0.5), 10)
    with pytest.raises(ValueError, match=r"\(10,\)"):
        comp.sparsify(np.zeros(11, np.float32))
    with pytest.raises(ValueError, match="float32"):
        comp.sparsify(np.zeros(10))
