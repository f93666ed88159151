"""clip_l2_ / clip_l1_: compiled against the NumPy twin (tests/backends.py), both backends on bounds, bounds, edge cases, errors."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from backends import COMPILED, both_backends
from edgefl._kernels.fallback import clip as twin

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.kernels, pytest.mark.cpu]

CLIPS = [("clip_l2_", 2), ("clip_l1_", 1)]

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
float32_arrays = hnp.arrays(np.float32, st.integers(0, 200), elements=finite_float32)
bounds = st.floats(min_value=1e-30, max_value=1e30)


def exact_norm(x, order):
    """The norm of float32 data with an exactly rounded sum (squares of float32 are exact in double)."""
    terms = x.astype(np.float64).ravel()
    if order == 2:
        return math.sqrt(math.fsum((terms * terms).tolist()))
    return math.fsum(np.abs(terms).tolist())


def bits(x):
    return x.view(np.uint32).copy()


@pytest.mark.parametrize("name, order", CLIPS)
@settings(max_examples=150, deadline=None)
@given(x=float32_arrays, max_norm=bounds)
def test_equals_twin_and_respects_the_bound(name, order, x, max_norm):
    ours, theirs = x.copy(), x.copy()
    norm = getattr(COMPILED, name)(ours, max_norm)
    assert norm == getattr(twin, name)(theirs, max_norm)
    assert np.array_equal(bits(ours), bits(theirs))
    assert norm == pytest.approx(exact_norm(x, order), rel=1e-12, abs=0)
    assert exact_norm(ours, order) <= max_norm
    if norm <= max_norm:
        assert np.array_equal(bits(ours), bits(x))


@pytest.mark.parametrize("name, order", CLIPS)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 63, 64, 65, 1000, 262_143, 262_177])
def test_lane_order_equals_twin_across_magnitudes(name, order, n):
    rng = np.random.default_rng(n)
    # magnitudes over 60 decades make the double sum order-sensitive: any reordering shows
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-70, 70, n))).astype(np.float32)
    ours, theirs = x.copy(), x.copy()
    assert getattr(COMPILED, name)(ours, 1.0) == getattr(twin, name)(theirs, 1.0)
    assert np.array_equal(bits(ours), bits(theirs))


@both_backends
@pytest.mark.parametrize("name, order", CLIPS)
def test_clips_to_the_bound_and_keeps_the_direction(K, name, order):
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    before = exact_norm(x, order)
    y = x.copy()
    assert getattr(K, name)(y, before / 4) == pytest.approx(before, rel=1e-12)
    assert exact_norm(y, order) == pytest.approx(before / 4, rel=1e-6)
    assert exact_norm(y, order) <= before / 4
    np.testing.assert_allclose(y, x / 4, rtol=1e-6)


@both_backends
@pytest.mark.parametrize("name, order", CLIPS)
def test_huge_magnitudes_do_not_overflow(K, name, order):
    x = np.full(1000, np.finfo(np.float32).max, dtype=np.float32)
    x[::2] *= -1
    norm = getattr(K, name)(x, 1.0)
    expected = float(np.finfo(np.float32).max) * (math.sqrt(1000) if order == 2 else 1000)
    assert norm == pytest.approx(expected, rel=1e-12)
    assert np.all(np.isfinite(x))
    assert exact_norm(x, order) <= 1.0


@pytest.mark.parametrize("name, order", CLIPS)
@pytest.mark.parametrize("x", [
    np.zeros(0, np.float32),
    np.full(77, -0.0, np.float32),
    np.full(77, 0.5, np.float32),
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
], ids=["empty", "negative-zero", "all-equal", "3-d"])
def test_edge_cases(name, order, x):
    ours, theirs = x.copy(), x.copy()
    norm = getattr(COMPILED, name)(ours, 2.0)
    assert norm == getattr(twin, name)(theirs, 2.0)
    assert norm == pytest.approx(exact_norm(x, order), rel=1e-12)
    assert np.array_equal(bits(ours), bits(theirs))
    assert exact_norm(ours, order) <= 2.0
    assert ours.shape == x.shape


@both_backends
@pytest.mark.parametrize("name, order", CLIPS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected_and_x_kept(K, name, order, bad):
    x = np.ones(100, np.float32)
    x[37] = bad
    kept = x.copy()
    with pytest.raises(ValueError, match=r"non-finite value .* index 37"):
        getattr(K, name)(x, 0.5)
    assert np.array_equal(bits(x), bits(kept))


@both_backends
@pytest.mark.parametrize("name, order", CLIPS)
def test_array_errors(K, name, order):
    clip = getattr(K, name)
    with pytest.raises(TypeError, match="dtype float32"):
        clip(np.ones(4), 1.0)
    with pytest.raises(TypeError, match="dtype float32, got >f4"):
        clip(np.ones(4, ">f4"), 1.0)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        clip([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        clip(np.ones(8, np.float32)[::2], 1.0)
    frozen = np.ones(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        clip(frozen, 1.0)


@both_backends
@pytest.mark.parametrize("name, order", CLIPS)
@pytest.mark.parametrize("bound, error", [
    (0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    ("1", TypeError), (None, TypeError),
])
def test_bound_errors(K, name, order, bound, error):
    x = np.ones(4, np.float32)
    with pytest.raises(error, match="max_norm"):
        getattr(K, name)(x, bound)
    assert np.array_equal(x, np.ones(4, np.float32))


def test_lane_sum_is_the_documented_order():
    """The twin's lane sum against a plain loop over the documented order."""
    terms = np.random.default_rng(3).standard_normal(1000) * 10.0 ** np.arange(-50, 50, 0.1)
    lanes = [0.0] * twin.LANES
    body = len(terms) - len(terms) % twin.LANES
    for i in range(body):
        lanes[i % twin.LANES] += terms[i]
    total = 0.0
    for value in lanes + terms[body:].tolist():
        total += value
    assert twin.lane_sum(terms) == total
