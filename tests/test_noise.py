"""laplace_ / gaussian_: bit-identical to the NumPy twin for the same seed, right distribution, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from backends import COMPILED, both_backends
from edgefl._kernels.fallback import noise as twin

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.kernels, pytest.mark.cpu]

NOISES = ["laplace_", "gaussian_"]
BIT_GENERATORS = [np.random.PCG64, np.random.PCG64DXSM, np.random.MT19937, np.random.Philox, np.random.SFC64]


def bits(x):
    return x.view(np.uint32).copy()


def noised(module, name, x, scale, seed, bit_generator=np.random.PCG64):
    out = x.copy()
    rng = np.random.Generator(bit_generator(seed))
    getattr(module, name)(out, scale, rng)
    return out, rng


@pytest.mark.parametrize("name", NOISES)
@pytest.mark.parametrize("bit_generator", BIT_GENERATORS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 2047, 2048, 2049, 10_001])
def test_bit_identical_to_twin(name, bit_generator, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    ours, ours_rng = noised(COMPILED, name, x, 0.7, 11, bit_generator)
    theirs, their_rng = noised(twin, name, x, 0.7, 11, bit_generator)
    assert np.array_equal(bits(ours), bits(theirs))
    # both consumed the stream the same way: the next draws agree too
    assert ours_rng.bit_generator.random_raw(4).tolist() == their_rng.bit_generator.random_raw(4).tolist()


@pytest.mark.parametrize("name", NOISES)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), n=st.integers(0, 300),
       scale=st.floats(min_value=1e-30, max_value=1e30))
def test_bit_identical_to_twin_any_seed_and_scale(name, seed, n, scale):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    with np.errstate(over="ignore"):
        ours, _ = noised(COMPILED, name, x, scale, seed)
        theirs, _ = noised(twin, name, x, scale, seed)
    assert np.array_equal(bits(ours), bits(theirs))


@both_backends
@pytest.mark.parametrize("name", NOISES)
def test_noise_is_added_to_the_values(K, name):
    x = np.random.default_rng(2).standard_normal((40, 25)).astype(np.float32)
    noise_only, _ = noised(K, name, np.zeros_like(x), 0.3, 5)
    ours, _ = noised(K, name, x, 0.3, 5)
    assert ours.shape == (40, 25)
    assert np.array_equal(bits(ours), bits(x + noise_only))


@both_backends
@pytest.mark.parametrize("name", NOISES)
def test_reproducible_from_a_seed(K, name):
    x = np.zeros(1000, np.float32)
    first, _ = noised(K, name, x, 1.0, 42)
    again, _ = noised(K, name, x, 1.0, 42)
    other, _ = noised(K, name, x, 1.0, 43)
    assert np.array_equal(bits(first), bits(again))
    assert np.count_nonzero(first != other) > 990


@both_backends
def test_laplace_distribution(K):
    b = 0.5
    sample, _ = noised(K, "laplace_", np.zeros(200_000, np.float32), b, 2024)
    n = sample.size
    # Laplace(0, b): mean 0, standard deviation sqrt(2) b, mean absolute value b
    assert abs(sample.mean()) < 5 * np.sqrt(2) * b / np.sqrt(n)
    assert abs(np.abs(sample).mean() - b) < 5 * b / np.sqrt(n)
    assert sample.std() == pytest.approx(np.sqrt(2) * b, rel=0.02)
    assert abs(np.mean(sample > 0) - 0.5) < 5 * 0.5 / np.sqrt(n)
    assert stats.kstest(sample, stats.laplace(scale=b).cdf).pvalue > 1e-3
    # and it is not a Gaussian of the same variance
    assert stats.kstest(sample, stats.norm(scale=np.sqrt(2) * b).cdf).pvalue < 1e-6


@both_backends
def test_gaussian_distribution(K):
    sigma = 2.0
    sample, _ = noised(K, "gaussian_", np.zeros(200_000, np.float32), sigma, 2024)
    n = sample.size
    assert abs(sample.mean()) < 5 * sigma / np.sqrt(n)
    assert sample.std() == pytest.approx(sigma, rel=0.02)
    assert stats.kstest(sample, stats.norm(scale=sigma).cdf).pvalue > 1e-3
    assert stats.kstest(sample, stats.laplace(scale=sigma / np.sqrt(2)).cdf).pvalue < 1e-6


@both_backends
@pytest.mark.parametrize("name", NOISES)
@pytest.mark.parametrize("rng", [np.random.RandomState(0), np.random.PCG64(0), None, 0],
                         ids=["RandomState", "BitGenerator", "None", "int"])
def test_rng_must_be_a_generator(K, name, rng):
    x = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        getattr(K, name)(x, 1.0, rng)


@both_backends
@pytest.mark.parametrize("name", NOISES)
@pytest.mark.parametrize("scale, error", [
    (0.0, ValueError), (-1.0, ValueError), (np.nan, ValueError), (np.inf, ValueError),
    (1e-50, ValueError), (1e39, ValueError), ("1", TypeError), (None, TypeError),
])
def test_scale_errors_leave_x_and_rng_untouched(K, name, scale, error):
    x = np.ones(8, np.float32)
    rng = np.random.default_rng(9)
    state = rng.bit_generator.state
    with pytest.raises(error, match="scale|sigma"):
        getattr(K, name)(x, scale, rng)
    assert np.array_equal(x, np.ones(8, np.float32))
    assert rng.bit_generator.state == state


@both_backends
@pytest.mark.parametrize("name", NOISES)
def test_array_errors(K, name):
    add = getattr(K, name)
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="dtype float32"):
        add(np.zeros(4), 1.0, rng)
    with pytest.raises(TypeError, match="dtype float32, got >f4"):
        add(np.zeros(4, ">f4"), 1.0, rng)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        add([0.0], 1.0, rng)
    with pytest.raises(ValueError, match="C-contiguous"):
        add(np.zeros((4, 4), np.float32).T, 1.0, rng)
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        add(frozen, 1.0, rng)
