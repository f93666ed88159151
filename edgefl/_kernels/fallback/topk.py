"""Top-k sparsification in NumPy: the twin of the compiled ``topk`` kernels, and their oracle.

Every function returns exactly what the compiled kernel returns, bit for bit:

* selection is by magnitude ``abs(x)``, where ``-0.0`` and ``0.0`` are equal, and among equal
  magnitudes the lower (flat) index wins, so the selected set is unique;
* indices come back as uint32, sorted ascending, values as float32 with ``vals == x.flat[idx]``;
* :func:`randomk` is a pure function of ``(n, k, seed)`` built only from 64-bit integer arithmetic
  (SplitMix64 driving Floyd's sampling), so any implementation of the documented algorithm, in any
  language on any platform, picks the same coordinates.

The argument checks live here and the compiled module imports them, so both backends reject bad
input with the same exception and message.
"""

import numpy as np
from edgefl._kernels.checks.topk import (check_array, check_error_feedback_arrays, check_k,
                                         check_randomk_args, check_tau, raise_non_finite,
                                         raise_non_finite_sum)
from edgefl._kernels.docs import document


# SplitMix64 (Steele, Lea and Flood, OOPSLA 2014; Vigna's reference C code) constants.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Argument checks, shared with the compiled module.


# ---------------------------------------------------------------------------------------------
# Kernels.

def _select_topk(values, k):
    """Sorted uint32 indices of the k largest magnitudes of finite ``values``, lower index first."""
    n = values.shape[0]
    if k == 0:
        return np.empty(0, dtype=np.uint32)
    if k == n:
        return np.arange(n, dtype=np.uint32)
    magnitude = np.abs(values)
    kth = np.partition(magnitude, n - k)[n - k]  # the k-th largest magnitude
    chosen = magnitude > kth
    ties = np.flatnonzero(magnitude == kth)[: k - np.count_nonzero(chosen)]
    chosen[ties] = True
    return np.flatnonzero(chosen).astype(np.uint32)


def topk(x, k):
    flat = check_array(x, "x")
    k = check_k(k, flat.shape[0])
    if not np.isfinite(flat).all():
        raise_non_finite(flat, "x")
    idx = _select_topk(flat, k)
    return idx, flat[idx]


def topk_ef_(residual, update, k):
    r, u = check_error_feedback_arrays(residual, update)
    k = check_k(k, r.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):  # reported just below, as a ValueError
        total = r + u
    if not np.isfinite(total).all():
        raise_non_finite_sum(r, u)
    idx = _select_topk(total, k)
    vals = total[idx]
    total[idx] = 0.0
    r[...] = total
    return idx, vals


def threshold_select(x, tau):
    flat = check_array(x, "x")
    tau = check_tau(tau)
    if not np.isfinite(flat).all():
        raise_non_finite(flat, "x")
    # A float64 scalar makes NumPy compare in double, so tau is never rounded to float32.
    idx = np.flatnonzero(np.abs(flat) > np.float64(tau)).astype(np.uint32)
    return idx, flat[idx]


def _splitmix64(state):
    """Advance SplitMix64: return (new state, 64-bit output)."""
    state = (state + _GAMMA) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return state, z ^ (z >> 31)


def randomk(n, k, seed):
    n, k, seed = check_randomk_args(n, k, seed)
    state = seed
    chosen = set()
    for j in range(n - k, n):
        m = j + 1
        reject_below = (1 << 64) % m
        state, z = _splitmix64(state)
        while z < reject_below:
            state, z = _splitmix64(state)
        t = z % m
        chosen.add(j if t in chosen else t)
    return np.sort(np.fromiter(chosen, dtype=np.uint32, count=k))


document(topk, topk_ef_, threshold_select, randomk)
