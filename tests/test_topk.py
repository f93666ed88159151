"""Top-k family (edgefl.kernels) against its NumPy twin and against the definitions.

The compiled kernels are held to the twin bit for bit, and both backends to independent
definitions (a stable sort of ``-abs(x)``, ``abs(x) > tau`` in double, SplitMix64's published
test vectors), whatever ``EDGEFL_PUREPYTHON`` says (tests/backends.py).
"""
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from backends import COMPILED, both_backends
from edgefl._kernels.fallback import topk as twin

# cpu: run again on an emulated aarch64 CPU by make test-arm64
pytestmark = [pytest.mark.kernels, pytest.mark.cpu]

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_same_selection(got, expected):
    """Equal indices (uint32) and bit-identical values (so the sign of -0.0 counts too)."""
    (idx, vals), (want_idx, want_vals) = got, expected
    assert idx.dtype == np.uint32 and vals.dtype == np.float32
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(vals.view(np.uint32), want_vals.view(np.uint32))


def topk_by_definition(x, k):
    """The k largest magnitudes, ties to the lower index: a stable sort of -abs(x) in float64."""
    flat = x.reshape(-1)
    order = np.argsort(-np.abs(flat.astype(np.float64)), kind="stable")
    idx = np.sort(order[:k]).astype(np.uint32)
    return idx, flat[idx]


# Values that stress the selection: ties, both zeros, subnormals, the largest finite floats.
EDGE_VALUES = [0.0, -0.0, 1.0, -1.0, 2.0, 1e-45, -1e-45, 1e-38, 3.4028235e38, -3.4028235e38,
               np.nextafter(np.float32(1.0), np.float32(2.0)), -0.5, 0.5]


@st.composite
def vectors_and_k(draw, max_size=300):
    """A float32 vector (plain finite floats, or tie-heavy edge values) and a k in [0, n]."""
    n = draw(st.integers(0, max_size))
    elements = draw(st.sampled_from([
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.sampled_from(EDGE_VALUES),
        st.integers(-3, 3).map(float),
    ]))
    x = draw(hnp.arrays(np.float32, n, elements=elements))
    return x, draw(st.integers(0, n))


# --------------------------------------------------------------------------------------------
# topk

@SETTINGS
@given(vectors_and_k())
def test_topk_equals_twin_and_definition(case):
    x, k = case
    got = COMPILED.topk(x, k)
    assert_same_selection(got, twin.topk(x, k))
    assert_same_selection(got, topk_by_definition(x, k))


@pytest.mark.parametrize("name, make", [
    ("gaussian", lambda rng, n: rng.standard_normal(n)),
    ("heavy tails", lambda rng, n: rng.standard_cauchy(n)),
    # Error feedback piles values up just below the threshold: the boundary bin of the first radix
    # level is crowded and only the deeper levels can separate it.
    ("crowded boundary", lambda rng, n: 1.0 + rng.integers(0, 1 << 10, n) * 2.0**-23),
    ("few distinct values", lambda rng, n: rng.integers(-4, 5, n)),
    ("subnormal", lambda rng, n: rng.integers(-1000, 1000, n) * 1e-45),
    ("all equal", lambda rng, n: np.full(n, -7.5)),
])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.5])
def test_topk_large_equals_definition(name, make, fraction):
    rng = np.random.default_rng(7)
    n = 100_003
    x = make(rng, n).astype(np.float32)
    k = int(n * fraction)
    got = COMPILED.topk(x, k)
    assert_same_selection(got, topk_by_definition(x, k))
    assert_same_selection(got, twin.topk(x, k))


@both_backends
@pytest.mark.parametrize("sampled_big", [True, False])
def test_topk_layouts_against_the_sample_stride(K, sampled_big):
    """Large entries exactly where an evenly spaced sample looks, or exactly where it does not:
    a bound estimated from such a sample is wrong, and the result must still be exact."""
    n, k = 4096 * 20, 2000
    rng = np.random.default_rng(11)
    on_stride = np.arange(n) % 20 == 0
    big = on_stride if sampled_big else ~on_stride
    x = np.where(big, 10.0, 1.0).astype(np.float32) + rng.random(n, dtype=np.float32)
    assert_same_selection(K.topk(x, k), topk_by_definition(x, k))
    residual = np.zeros(n, np.float32)
    expected = x.copy()
    idx, vals = K.topk_ef_(residual, x, k)
    assert_same_selection((idx, vals), topk_by_definition(x, k))
    expected[idx] = 0.0
    np.testing.assert_array_equal(residual, expected)


@both_backends
def test_topk_edge_sizes(K):
    x = np.array([3.0, -4.0, 0.0, -0.0, 4.0], dtype=np.float32)
    assert_same_selection(K.topk(x, 0), (np.empty(0, np.uint32), np.empty(0, np.float32)))
    assert_same_selection(K.topk(x, 5), (np.arange(5, dtype=np.uint32), x))
    # |-4| == |4|: the lower index goes first; 0.0 and -0.0 tie, so index 2 beats index 3.
    assert_same_selection(K.topk(x, 1), (np.array([1], np.uint32), np.array([-4.0], np.float32)))
    assert_same_selection(K.topk(x, 4), (np.array([0, 1, 2, 4], np.uint32),
                                         np.array([3.0, -4.0, 0.0, 4.0], np.float32)))
    empty = np.empty(0, dtype=np.float32)
    assert_same_selection(K.topk(empty, 0), (np.empty(0, np.uint32), empty))


@both_backends
def test_read_only_and_multidimensional_input_is_fine_for_selection(K):
    x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4)
    x.flags.writeable = False
    idx, vals = K.topk(x, 3)
    np.testing.assert_array_equal(idx, [0, 1, 11])  # -6, -5, 5: flat indices
    np.testing.assert_array_equal(vals, [-6.0, -5.0, 5.0])
    idx, vals = K.threshold_select(x, 4.5)
    np.testing.assert_array_equal(idx, [0, 1, 11])
    np.testing.assert_array_equal(vals, [-6.0, -5.0, 5.0])


@both_backends
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n, k", [(9, 0), (9, 1), (9, 4), (100_000, 0), (100_000, 1000),
                                  (100_000, 50_000)])
def test_topk_rejects_non_finite_and_names_the_index(K, bad, n, k):
    x = np.ones(n, dtype=np.float32)
    x[6] = bad
    with pytest.raises(ValueError, match=r"x is not finite at flat index 6"):
        K.topk(x, k)


def test_topk_argument_errors():
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(TypeError, match="x must have dtype float32, got float64"):
        COMPILED.topk(np.ones(10), 2)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        COMPILED.topk([1.0, 2.0], 1)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        COMPILED.topk(np.ones(20, dtype=np.float32)[::2], 2)
    with pytest.raises(ValueError, match=r"0 <= k <= n = 10, got k = 11"):
        COMPILED.topk(x, 11)
    with pytest.raises(ValueError, match=r"got k = -1"):
        COMPILED.topk(x, -1)
    with pytest.raises(TypeError, match="k must be an integer, got float"):
        COMPILED.topk(x, 2.0)
    assert_same_selection(COMPILED.topk(x, np.int64(2)), twin.topk(x, 2))


# --------------------------------------------------------------------------------------------
# topk_ef_

@SETTINGS
@given(vectors_and_k(), st.data())
def test_topk_ef_invariants_and_twin(case, data):
    residual, k = case
    update = data.draw(hnp.arrays(np.float32, residual.shape, elements=st.one_of(
        st.floats(-2.0**20, 2.0**20, width=32), st.sampled_from([0.0, -0.0, 1e-45, -1.0]))))
    total = residual + update  # what the kernel must accumulate
    assume(np.isfinite(total).all())  # overflow to Inf is an error case, tested below
    ours, theirs = residual.copy(), residual.copy()
    idx, vals = COMPILED.topk_ef_(ours, update, k)
    # Emitted: the top-k of the accumulated residual, with its values before zeroing.
    assert_same_selection((idx, vals), topk_by_definition(total, k))
    # Kept: everything else of the accumulated residual, the emitted coordinates zeroed.
    expected = total.copy()
    expected[idx] = 0.0
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
    assert_same_selection((idx, vals), twin.topk_ef_(theirs, update, k))
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_topk_ef_rounds_match_twin_and_lose_nothing():
    """Over many rounds, what was sent plus what is left equals everything that came in."""
    rng = np.random.default_rng(3)
    n, k = 70_000, 700
    ours = np.zeros(n, np.float32)
    theirs = np.zeros(n, np.float32)
    sent = np.zeros(n, np.float64)
    received = np.zeros(n, np.float64)
    for _ in range(20):
        update = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        received += update
        got = COMPILED.topk_ef_(ours, update, k)
        assert_same_selection(got, twin.topk_ef_(theirs, update, k))
        sent[got[0]] += got[1]
    np.testing.assert_array_equal(ours, theirs)
    # Only float32 rounding of the accumulation separates the two.
    np.testing.assert_allclose(sent + ours, received, atol=1e-5)


@both_backends
def test_topk_ef_k_zero_accumulates_only(K):
    residual = np.array([1.0, -2.0, 0.5], np.float32)
    idx, vals = K.topk_ef_(residual, np.array([0.5, 0.5, 0.5], np.float32), 0)
    assert idx.shape == vals.shape == (0,)
    np.testing.assert_array_equal(residual, [1.5, -1.5, 1.0])


@both_backends
@pytest.mark.parametrize("residual_value, update_value", [
    (np.nan, 0.0), (0.0, np.inf), (3e38, 3e38),  # the last overflows only when added
])
@pytest.mark.parametrize("n, k", [(8, 2), (100_000, 1000), (100_000, 50_000)])
def test_topk_ef_non_finite_sum_leaves_residual_unchanged(K, residual_value, update_value, n, k):
    residual = np.arange(n, dtype=np.float32)
    update = np.ones(n, np.float32)
    residual[5], update[5] = residual_value, update_value
    before = residual.copy()
    with pytest.raises(ValueError, match=r"not finite at flat index 5.*residual is left unchanged"):
        K.topk_ef_(residual, update, k)
    np.testing.assert_array_equal(residual, before)


@both_backends
def test_topk_ef_argument_errors(K):
    residual = np.zeros(6, np.float32)
    update = np.ones(6, np.float32)
    read_only = residual.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="residual is read-only"):
        K.topk_ef_(read_only, update, 1)
    with pytest.raises(ValueError, match=r"update has shape \(5,\) but residual has shape \(6,\)"):
        K.topk_ef_(residual, update[:5], 1)
    with pytest.raises(ValueError, match="update shares memory with residual"):
        K.topk_ef_(residual, residual, 1)
    with pytest.raises(TypeError, match="update must have dtype float32, got float64"):
        K.topk_ef_(residual, np.ones(6), 1)
    with pytest.raises(ValueError, match="update must be C-contiguous"):
        K.topk_ef_(residual, np.ones(12, np.float32)[::2], 1)
    with pytest.raises(ValueError, match=r"got k = 7"):
        K.topk_ef_(residual, update, 7)
    np.testing.assert_array_equal(residual, 0.0)  # nothing above touched it
    update.flags.writeable = False  # only the residual needs to be writeable
    idx, _ = K.topk_ef_(residual, update, 2)
    np.testing.assert_array_equal(idx, [0, 1])


# --------------------------------------------------------------------------------------------
# threshold_select

@SETTINGS
@given(vectors_and_k(), st.sampled_from([0.0, 1e-45, 0.1, 0.5, 1.0, 1.5, 1e30, 1e300]))
def test_threshold_select_equals_definition_and_twin(case, tau):
    x, _ = case
    idx = np.flatnonzero(np.abs(x.astype(np.float64)) > tau).astype(np.uint32)
    got = COMPILED.threshold_select(x, tau)
    assert_same_selection(got, (idx, x[idx]))
    assert_same_selection(got, twin.threshold_select(x, tau))


@both_backends
def test_threshold_select_compares_tau_exactly(K):
    # float32(0.1) is 0.100000001490116..., above the double 0.1 and equal to float32(0.1).
    x = np.array([0.1, -0.1, 0.0, -0.0, 0.2], np.float32)
    np.testing.assert_array_equal(K.threshold_select(x, 0.1)[0], [0, 1, 4])
    np.testing.assert_array_equal(K.threshold_select(x, float(np.float32(0.1)))[0], [4])
    np.testing.assert_array_equal(K.threshold_select(x, 0)[0], [0, 1, 4])  # both zeros excluded
    assert K.threshold_select(x, 1e300)[0].shape == (0,)


@both_backends
def test_threshold_select_errors(K):
    x = np.ones(4, np.float32)
    for tau in (-1e-9, math.nan, math.inf):
        with pytest.raises(ValueError, match="tau must be finite and >= 0"):
            K.threshold_select(x, tau)
    with pytest.raises(TypeError, match="tau must be a real number"):
        K.threshold_select(x, "0.5")
    x[2] = np.nan
    with pytest.raises(ValueError, match="x is not finite at flat index 2"):
        K.threshold_select(x, 0.5)


# --------------------------------------------------------------------------------------------
# randomk

# Outputs fixed once; a change here means devices on different versions pick different
# coordinates for the same announced seed, which breaks random-k aggregation.
GOLDEN = [
    ((10, 3, 0), [0, 7, 9]),
    ((100, 5, 1), [29, 44, 61, 64, 65]),
    ((1000, 10, 2**64 - 1), [9, 46, 98, 244, 291, 336, 652, 703, 812, 816]),
    ((1_000_000, 8, 12345), [86585, 158742, 367068, 449579, 636360, 771698, 829703, 984378]),
]


@both_backends
@pytest.mark.parametrize("args, expected", GOLDEN)
def test_randomk_golden_values(K, args, expected):
    idx = K.randomk(*args)
    assert idx.dtype == np.uint32
    np.testing.assert_array_equal(idx, expected)


def test_splitmix64_matches_reference_vectors():
    # The first outputs of Vigna's splitmix64.c for seed 1234567.
    state, outputs = 1234567, []
    for _ in range(5):
        state, z = twin._splitmix64(state)
        outputs.append(z)
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                       4593380528125082431, 16408922859458223821]


@SETTINGS
@given(st.integers(0, 5000), st.data(), st.integers(0, 2**64 - 1))
def test_randomk_contract_and_twin(n, data, seed):
    k = data.draw(st.integers(0, n))
    idx = COMPILED.randomk(n, k, seed)
    assert idx.dtype == np.uint32 and idx.shape == (k,)
    assert (np.diff(idx.astype(np.int64)) > 0).all()  # sorted and distinct
    assert k == 0 or idx[-1] < n
    np.testing.assert_array_equal(idx, twin.randomk(n, k, seed))
    np.testing.assert_array_equal(idx, COMPILED.randomk(np.uint64(n), np.int32(k), np.uint64(seed)))


def test_randomk_large_equals_twin():
    np.testing.assert_array_equal(COMPILED.randomk(10**6, 10**4, 99), twin.randomk(10**6, 10**4, 99))
    np.testing.assert_array_equal(COMPILED.randomk(1000, 1000, 5), np.arange(1000))


@both_backends
def test_randomk_every_subset_equally_likely(K):
    """Chi-square over all 20 subsets of 3 out of 6, one draw per seed."""
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(6), 3))}
    counts = np.zeros(len(subsets))
    for seed in range(6000):
        counts[subsets[tuple(K.randomk(6, 3, seed).tolist())]] += 1
    assert stats.chisquare(counts).pvalue > 1e-4, counts


@both_backends
def test_randomk_every_coordinate_equally_likely(K):
    """Chi-square of how often each of 200 coordinates is picked, k = 20, over 3000 seeds."""
    counts = np.zeros(200)
    for seed in range(3000):
        counts[K.randomk(200, 20, seed * 7919 + 1)] += 1
    assert stats.chisquare(counts).pvalue > 1e-4, counts


@both_backends
def test_randomk_errors(K):
    with pytest.raises(ValueError, match=r"0 <= k <= n = 5, got k = 6"):
        K.randomk(5, 6, 0)
    with pytest.raises(ValueError, match="0 <= n <= 2\\*\\*32"):
        K.randomk(2**32 + 1, 1, 0)
    with pytest.raises(ValueError, match="0 <= n <= 2\\*\\*32"):
        K.randomk(-1, 0, 0)
    with pytest.raises(ValueError, match="seed must satisfy 0 <= seed < 2\\*\\*64, got seed = -1"):
        K.randomk(5, 1, -1)
    with pytest.raises(ValueError, match="seed must satisfy"):
        K.randomk(5, 1, 2**64)
    with pytest.raises(TypeError, match="seed must be an integer"):
        K.randomk(5, 1, 1.5)
    with pytest.raises(TypeError, match="n must be an integer"):
        K.randomk(5.0, 1, 1)
