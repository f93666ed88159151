"""Top-k sparsification kernels: which coordinates of an update a device sends.

``topk`` picks the k entries of largest magnitude, ``topk_ef_`` does the same with error feedback
fused in, ``threshold_select`` keeps every entry above a threshold and ``randomk`` picks k
coordinates from a seed the server announces. Results equal the NumPy twin
(:mod:`edgefl._kernels.fallback.topk`) bit for bit; the argument checks are shared with it (:mod:`edgefl._kernels.checks.topk`).

How top-k is selected: a radix select on the float bit patterns. With the sign bit cleared, the
bits of a float read as an unsigned integer order exactly like its magnitude (the *key*). Pass 1
counts the keys' top 12 bits in a histogram (which also finds NaN/Inf: they fill the top bins);
the bin holding the k-th largest key follows from a scan of the counts. Pass 2 collects, in index
order, every entry whose bin is at or above that boundary bin: a short candidate list. The keys
of the candidates in the boundary bin are then narrowed with two more radix levels (11 and 8 bits)
to the exact k-th largest key and the number of entries equal to it that still fit; a final walk
over the candidates emits them sorted by index, ties going to the lower index. Two passes over
the data instead of NumPy's introselect, and no sort of the output.

For the usual sparsification (k <= n/20, n >= 65536) one pass suffices: a sample of 4096 evenly
spaced keys gives a bound that lies below the k-th largest key with a wide margin, one
collecting pass gathers the entries at or above it, and the exact selection above runs on those
candidates only. The sample only decides how fast the answer comes, never what it is: when the
bound turns out too high or too low (data laid out against the sample's stride), the two-pass
select runs instead.
"""
from libc.float cimport FLT_MAX
from libc.math cimport nextafterf, sqrt
from libc.stdlib cimport calloc, free, malloc

import numpy as np

cimport numpy as cnp

from edgefl._kernels._typedefs cimport float32_t, intp_t, uint32_t, uint64_t
from edgefl._kernels.topk cimport (
    EDGEFL_TOPK_BINS, EDGEFL_TOPK_OVERFLOW, EDGEFL_TOPK_SHIFT,
    edgefl_collect_above, edgefl_count_above, edgefl_lowest_bit, edgefl_magnitude_key,
    edgefl_max_key_sum, edgefl_topk_accumulate_collect, edgefl_topk_collect,
    edgefl_topk_histogram, edgefl_topk_sample_keys,
)

from edgefl._kernels.checks.topk import (
    check_array, check_error_feedback_arrays, check_k, check_randomk_args, check_tau,
    empty_selection,
    raise_non_finite, raise_non_finite_sum,
)
from edgefl._kernels.docs import document

cnp.import_array()

cdef enum:
    # Keys of NaN and Inf start at 0x7f800000: they land in the level-1 bins from here up.
    NON_FINITE_KEY = 0x7f800000
    # Levels 2 and 3 resolve the 19 key bits below level 1 inside the boundary bin: 11, then 8.
    LEVEL2_SHIFT = 8
    LEVEL2_BINS = 1 << 11
    LEVEL3_BINS = 1 << 8
    # The sampled path (see _topk_sampled) serves n >= SAMPLED_MIN_N and k <= n / 20; below, or
    # for denser selections, the two-pass radix select is as fast.
    SAMPLED_MIN_N = 1 << 16
    SAMPLED_MAX_DENSITY_INV = 20
    SAMPLES = 4096

cdef enum Status:
    # What the nogil cores report; the wrappers raise after the loops, never inside them.
    OK = 0
    NON_FINITE = 1
    NO_MEMORY = 2
    RETRY = 3  # the sampled path's bound was too high: run the two-pass path


cdef inline void* _data(object array):
    """Start of the buffer of an ndarray the argument checks have accepted (C-contiguous).

    Cheaper than acquiring a typed memoryview, which matters for small updates."""
    return cnp.PyArray_DATA(<cnp.ndarray> array)


cdef intp_t _boundary_bin(const intp_t* counts, intp_t bins, intp_t k, intp_t* above) noexcept nogil:
    """The bin holding the k-th largest key (1 <= k <= total count); ``above`` gets the number of
    keys in higher bins."""
    cdef intp_t b = bins - 1
    cdef intp_t higher = 0
    while higher + counts[b] < k:
        higher += counts[b]
        b -= 1
    above[0] = higher
    return b


cdef int _histogram(const float32_t* x, const float32_t* u, intp_t n,
                    intp_t* counts) noexcept nogil:
    """Pass 1: level-1 counts of the keys of ``x``, or of ``x + u`` if ``u`` is not NULL.

    NON_FINITE if a NaN/Inf bin is used."""
    cdef intp_t b
    if edgefl_topk_histogram(x, u, n, counts) != 0:
        return NO_MEMORY
    for b in range(NON_FINITE_KEY >> EDGEFL_TOPK_SHIFT, EDGEFL_TOPK_BINS):
        if counts[b]:
            return NON_FINITE
    return OK


cdef uint32_t _kth_largest_key(uint32_t* keys, intp_t m, intp_t k, intp_t* ties) noexcept nogil:
    """The k-th largest of ``m`` keys that share their level-1 bin (1 <= k <= m).

    ``ties`` gets how many keys equal to the result are among the k largest. ``keys`` is
    reordered (compacted in place)."""
    cdef intp_t level2[LEVEL2_BINS]
    cdef intp_t level3[LEVEL3_BINS]
    cdef intp_t j, above, kept = 0
    cdef intp_t bin2, bin3
    cdef uint32_t key
    for j in range(LEVEL2_BINS):
        level2[j] = 0
    for j in range(m):
        level2[(keys[j] >> LEVEL2_SHIFT) & (LEVEL2_BINS - 1)] += 1
    bin2 = _boundary_bin(level2, LEVEL2_BINS, k, &above)
    k -= above
    for j in range(m):
        key = keys[j]
        if <intp_t> ((key >> LEVEL2_SHIFT) & (LEVEL2_BINS - 1)) == bin2:
            keys[kept] = key
            kept += 1
    for j in range(LEVEL3_BINS):
        level3[j] = 0
    for j in range(kept):
        level3[keys[j] & (LEVEL3_BINS - 1)] += 1
    bin3 = _boundary_bin(level3, LEVEL3_BINS, k, &above)
    ties[0] = k - above
    return (keys[0] & ~<uint32_t> (LEVEL3_BINS - 1)) | <uint32_t> bin3


cdef void _emit(const float32_t* x, const uint32_t* candidates, intp_t m, intp_t k,
                intp_t above, uint32_t boundary, uint32_t* keys,
                uint32_t* out_idx, float32_t* out_vals) noexcept nogil:
    """Write the k largest of the ``m`` candidates to the outputs, in index order.

    ``above`` candidates lie in level-1 bins higher than ``boundary``, the others in ``boundary``,
    which holds the k-th largest key; ``keys`` is scratch space for ``m - above`` keys."""
    cdef intp_t j, emitted = 0, ties_taken = 0, ties, in_boundary = 0
    cdef uint32_t i, key, threshold
    for j in range(m):
        key = edgefl_magnitude_key(x[candidates[j]])
        if (key >> EDGEFL_TOPK_SHIFT) == boundary:
            keys[in_boundary] = key
            in_boundary += 1
    threshold = _kth_largest_key(keys, in_boundary, k - above, &ties)
    for j in range(m):
        i = candidates[j]
        key = edgefl_magnitude_key(x[i])
        if key > threshold or (key == threshold and ties_taken < ties):
            ties_taken += key == threshold
            out_idx[emitted] = i
            out_vals[emitted] = x[i]
            emitted += 1


cdef uint32_t _kth_largest_of(uint32_t* keys, intp_t m, intp_t k, intp_t* counts) noexcept nogil:
    """The k-th largest of any ``m`` keys (1 <= k <= m); ``keys`` is reordered, ``counts`` is
    scratch space for EDGEFL_TOPK_BINS counters."""
    cdef intp_t j, above, kept = 0, ties
    for j in range(EDGEFL_TOPK_BINS):
        counts[j] = 0
    for j in range(m):
        counts[keys[j] >> EDGEFL_TOPK_SHIFT] += 1
    cdef intp_t boundary = _boundary_bin(counts, EDGEFL_TOPK_BINS, k, &above)
    for j in range(m):
        if <intp_t> (keys[j] >> EDGEFL_TOPK_SHIFT) == boundary:
            keys[kept] = keys[j]
            kept += 1
    return _kth_largest_key(keys, kept, k - above, &ties)


cdef int _topk_sampled(float32_t* x, const float32_t* u, intp_t n, intp_t k, intp_t* counts,
                       uint32_t* out_idx, float32_t* out_vals) noexcept nogil:
    """Top-k in one pass over ``x`` when k is small: a bound from a sample replaces the histogram.

    The bound is a key that SAMPLES evenly spaced entries suggest lies below the k-th largest:
    of the sample, the expected number of top-k entries plus four standard deviations plus four
    rank above it. One collecting pass gathers every entry at or above the bound (about 1.5 k of
    them) and the exact top-k is selected among those, so the result never depends on the
    sample. Should fewer than k entries reach the bound, or more than the buffer holds (data
    laid out against the sample's stride), RETRY asks for the two-pass path.

    With ``u`` (error feedback), a first read-only pass checks that ``x + u`` is finite, and the
    collecting pass stores ``x += u`` whatever happens after. Returns OK, NON_FINITE (``x``
    unchanged), NO_MEMORY (``x`` unchanged) or RETRY. ``counts`` is scratch space for
    EDGEFL_TOPK_BINS counters.
    """
    cdef uint32_t sample[SAMPLES]
    cdef uint32_t largest = 0
    cdef double expected = <double> k * SAMPLES / n
    cdef intp_t rank = <intp_t> (expected + 4.0 * sqrt(expected)) + 4
    cdef intp_t capacity, j, kept = 0, above
    cdef size_t m
    if u != NULL and edgefl_max_key_sum(x, u, n) >= NON_FINITE_KEY:
        return NON_FINITE
    edgefl_topk_sample_keys(x, u, n, SAMPLES, sample)
    cdef uint32_t lowest = _kth_largest_of(sample, SAMPLES, rank if rank < SAMPLES else SAMPLES,
                                           counts)
    # Twice the expected number of entries at or above the bound, with room for small k.
    capacity = 2 * ((n // SAMPLES + 1) * rank) + 1024
    cdef uint32_t* candidates = <uint32_t*> malloc(capacity * sizeof(uint32_t))
    cdef uint32_t* keys = <uint32_t*> malloc(capacity * sizeof(uint32_t))
    if candidates == NULL or keys == NULL:
        free(candidates)
        free(keys)
        return NO_MEMORY
    if u == NULL:
        m = edgefl_topk_collect(x, n, lowest, candidates, capacity, &largest)
    else:
        m = edgefl_topk_accumulate_collect(x, u, n, lowest, candidates, capacity)
    cdef int status = OK
    cdef intp_t boundary, found
    if largest >= NON_FINITE_KEY:
        status = NON_FINITE
    elif m == EDGEFL_TOPK_OVERFLOW or <intp_t> m < k:
        status = RETRY
    else:
        # The exact top-k among the candidates, as in the two-pass path but over m entries.
        found = <intp_t> m
        for j in range(EDGEFL_TOPK_BINS):
            counts[j] = 0
        for j in range(found):
            counts[edgefl_magnitude_key(x[candidates[j]]) >> EDGEFL_TOPK_SHIFT] += 1
        boundary = _boundary_bin(counts, EDGEFL_TOPK_BINS, k, &above)
        for j in range(found):
            if <intp_t> (edgefl_magnitude_key(x[candidates[j]]) >> EDGEFL_TOPK_SHIFT) >= boundary:
                candidates[kept] = candidates[j]
                kept += 1
        _emit(x, candidates, kept, k, above, <uint32_t> boundary, keys, out_idx, out_vals)
    free(candidates)
    free(keys)
    return status


cdef int _topk_into(float32_t* x, const float32_t* u, intp_t n, intp_t k,
                    uint32_t* out_idx, float32_t* out_vals) noexcept nogil:
    """Top-k of ``x[:n]`` into ``out_idx[:k]`` (sorted) and ``out_vals[:k]``.

    With ``u`` not NULL, error feedback: ``x += u`` first and the emitted entries of ``x`` zeroed
    after. Returns OK, NON_FINITE (NaN or Inf; ``x`` unchanged) or NO_MEMORY (``x`` unchanged).
    """
    cdef bint error_feedback = u != NULL
    cdef intp_t j
    cdef int status = RETRY
    # Level-1 counters on the heap: small thread stacks (musl's 128 KiB) must not overflow.
    cdef intp_t* counts = <intp_t*> malloc(EDGEFL_TOPK_BINS * sizeof(intp_t))
    if counts == NULL:
        return NO_MEMORY
    if k > 0 and n >= SAMPLED_MIN_N and k * SAMPLED_MAX_DENSITY_INV <= n:
        status = _topk_sampled(x, u, n, k, counts, out_idx, out_vals)
        if status == RETRY:
            u = NULL  # x already holds x + u, which is finite
    if status == RETRY:
        status = _topk_two_pass(x, u, n, k, counts, out_idx, out_vals)
    free(counts)
    if status == OK and error_feedback:
        for j in range(k):
            x[out_idx[j]] = 0.0
    return status


cdef int _topk_two_pass(float32_t* x, const float32_t* u, intp_t n, intp_t k, intp_t* counts,
                        uint32_t* out_idx, float32_t* out_vals) noexcept nogil:
    """The radix select of the module docstring: a histogram pass, then a collecting pass.

    With ``u`` not NULL the collecting pass also stores ``x += u``. Returns OK, NON_FINITE or
    NO_MEMORY, with ``x`` unchanged on error. ``counts`` is scratch space for EDGEFL_TOPK_BINS
    counters."""
    cdef intp_t above = 0, m, in_boundary = 0
    cdef intp_t boundary = EDGEFL_TOPK_BINS  # with k == 0 no bin qualifies
    cdef uint32_t largest
    cdef int status = _histogram(x, u, n, counts)
    if status != OK or (k == 0 and u == NULL):
        return status
    if k > 0:
        boundary = _boundary_bin(counts, EDGEFL_TOPK_BINS, k, &above)
        in_boundary = counts[boundary]
    # Both buffers before pass 2, which is the one that writes x: a failure leaves x unchanged.
    cdef intp_t capacity = above + in_boundary
    cdef uint32_t* candidates = <uint32_t*> malloc((capacity + 1) * sizeof(uint32_t))
    cdef uint32_t* keys = <uint32_t*> malloc((in_boundary + 1) * sizeof(uint32_t))
    if candidates == NULL or keys == NULL:
        free(candidates)
        free(keys)
        return NO_MEMORY
    cdef uint32_t lowest = <uint32_t> boundary << EDGEFL_TOPK_SHIFT
    if u == NULL:
        m = edgefl_topk_collect(x, n, lowest, candidates, capacity, &largest)
    else:
        m = edgefl_topk_accumulate_collect(x, u, n, lowest, candidates, capacity)
    if k > 0:
        _emit(x, candidates, m, k, above, <uint32_t> boundary, keys, out_idx, out_vals)
    free(candidates)
    free(keys)
    return OK


cdef _raise_no_memory(str kernel, intp_t n, str state=""):
    raise MemoryError(f"{kernel}: out of memory for the work buffers of {n} elements{state}")


def topk(x, k):
    flat = check_array(x, "x")
    cdef intp_t n = flat.shape[0]
    cdef intp_t kk = check_k(k, n)
    if n == 0:
        return empty_selection()
    idx = np.empty(kk, dtype=np.uint32)
    vals = np.empty(kk, dtype=np.float32)
    # Without an update to add, _topk_into only reads x (which may be read-only).
    cdef float32_t* px = <float32_t*> _data(flat)
    cdef uint32_t* pidx = <uint32_t*> _data(idx)
    cdef float32_t* pvals = <float32_t*> _data(vals)
    cdef int status
    with nogil:
        status = _topk_into(px, NULL, n, kk, pidx, pvals)
    if status == NON_FINITE:
        raise_non_finite(flat, "x")
    if status == NO_MEMORY:
        _raise_no_memory("topk", n)
    return idx, vals


def topk_ef_(residual, update, k):
    r, u = check_error_feedback_arrays(residual, update)
    cdef intp_t n = r.shape[0]
    cdef intp_t kk = check_k(k, n)
    if n == 0:
        return empty_selection()
    idx = np.empty(kk, dtype=np.uint32)
    vals = np.empty(kk, dtype=np.float32)
    cdef float32_t* pr = <float32_t*> _data(r)
    cdef const float32_t* pu = <const float32_t*> _data(u)
    cdef uint32_t* pidx = <uint32_t*> _data(idx)
    cdef float32_t* pvals = <float32_t*> _data(vals)
    cdef int status
    with nogil:
        status = _topk_into(pr, pu, n, kk, pidx, pvals)
    if status == NON_FINITE:
        raise_non_finite_sum(r, u)
    if status == NO_MEMORY:
        # Only the fallback after a failed one-pass attempt can run out of memory after the
        # residual was written; say so rather than promise it is unchanged.
        _raise_no_memory("topk_ef_", n, "; residual may already include the update")
    return idx, vals


cdef uint32_t _threshold_key(double tau) noexcept nogil:
    """The key t such that, for every finite float32 v, ``abs(v) > tau`` exactly when
    ``edgefl_magnitude_key(v) > t``: the key of the largest float32 not above ``tau`` (tau >= 0)."""
    cdef float32_t below
    if tau >= FLT_MAX:
        return edgefl_magnitude_key(FLT_MAX)
    below = <float32_t> tau
    if <double> below > tau:
        below = nextafterf(below, 0.0)
    return edgefl_magnitude_key(below)


def threshold_select(x, tau):
    flat = check_array(x, "x")
    cdef uint32_t threshold = _threshold_key(check_tau(tau))
    cdef intp_t n = flat.shape[0]
    if n == 0:
        return empty_selection()
    cdef const float32_t* px = <const float32_t*> _data(flat)
    cdef size_t count
    cdef uint32_t largest
    with nogil:
        count = edgefl_count_above(px, n, threshold, &largest)
    if largest >= NON_FINITE_KEY:
        raise_non_finite(flat, "x")
    idx = np.empty(count, dtype=np.uint32)
    vals = np.empty(count, dtype=np.float32)
    if count == 0:
        return idx, vals
    cdef uint32_t* pidx = <uint32_t*> _data(idx)
    cdef float32_t* pvals = <float32_t*> _data(vals)
    with nogil:
        edgefl_collect_above(px, n, threshold, pidx, pvals)
    return idx, vals


cdef inline uint64_t _splitmix64(uint64_t* state) noexcept nogil:
    """SplitMix64 (Steele, Lea and Flood 2014), as in Vigna's reference C code."""
    state[0] += <uint64_t> 0x9E3779B97F4A7C15
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * <uint64_t> 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t> 0x94D049BB133111EB
    return z ^ (z >> 31)


cdef int _floyd_sample(uint64_t n, uint64_t k, uint64_t seed, uint32_t* out) noexcept nogil:
    """Floyd's sampling of k of n driven by SplitMix64; membership in a bitmap of n bits, which
    read in order also yields the sorted output."""
    cdef uint64_t words = (n + 63) // 64
    cdef uint64_t* chosen = <uint64_t*> calloc(words if words else 1, sizeof(uint64_t))
    cdef uint64_t state = seed, j, m, t, z, reject_below, word, w
    cdef intp_t emitted = 0
    if chosen == NULL:
        return NO_MEMORY
    for j in range(n - k, n):
        m = j + 1
        reject_below = (0 - m) % m  # 2**64 mod m: drawing z >= this makes z % m unbiased
        z = _splitmix64(&state)
        while z < reject_below:
            z = _splitmix64(&state)
        t = z % m
        if (chosen[t >> 6] >> (t & 63)) & 1:
            t = j
        chosen[t >> 6] |= (<uint64_t> 1) << (t & 63)
    for w in range(words):
        word = chosen[w]
        while word:
            out[emitted] = <uint32_t> (w * 64 + <uint64_t> edgefl_lowest_bit(word))
            emitted += 1
            word &= word - 1
    free(chosen)
    return OK


def randomk(n, k, seed):
    nn, kk, s = check_randomk_args(n, k, seed)
    idx = np.empty(kk, dtype=np.uint32)
    if kk == 0:
        return idx
    cdef uint32_t* pidx = <uint32_t*> _data(idx)
    cdef uint64_t n64 = nn, k64 = kk, seed64 = s
    cdef int status
    with nogil:
        status = _floyd_sample(n64, k64, seed64, pidx)
    if status == NO_MEMORY:
        raise MemoryError(f"randomk: out of memory for a bitmap of n = {nn} bits")
    return idx


document(topk, topk_ef_, threshold_select, randomk)
