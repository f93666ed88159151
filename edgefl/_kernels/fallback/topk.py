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
import math
import numbers
import operator

import numpy as np

#: Indices are uint32 on the wire, so an array may hold at most this many elements.
MAX_ELEMENTS = 1 << 32

# SplitMix64 (Steele, Lea and Flood, OOPSLA 2014; Vigna's reference C code) constants.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Argument checks, shared with the compiled module.

def _check_array(x, name, *, writeable=False):
    """Check that ``x`` is a C-contiguous float32 ndarray and return it flattened (a view)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(
            f"{name} must have dtype float32, got {x.dtype}; convert it first "
            f"({name} = {name}.astype(np.float32))"
        )
    if not x.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous (strides {x.strides}); the kernels never copy, so pass "
            f"np.ascontiguousarray({name})"
        )
    if writeable and not x.flags.writeable:
        raise ValueError(
            f"{name} is read-only; it is updated in place, so pass a writeable array ({name}.copy())"
        )
    if x.size > MAX_ELEMENTS:
        raise ValueError(
            f"{name} has {x.size} elements, more than 2**32: indices are uint32, so split the "
            "parameter vector into chunks"
        )
    return x if x.ndim == 1 else x.reshape(-1)


def _check_k(k, n, name="k"):
    """Check that ``k`` is an integer with ``0 <= k <= n`` and return it as an int."""
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(k).__name__} {k!r}") from None
    if not 0 <= k <= n:
        raise ValueError(f"{name} must satisfy 0 <= {name} <= n = {n}, got {name} = {k}")
    return k


def _check_tau(tau):
    """Check that ``tau`` is a finite real number >= 0 and return it as a float."""
    if not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__} {tau!r}")
    value = float(tau)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"tau must be finite and >= 0, got {tau!r}")
    return value


def _check_randomk_args(n, k, seed):
    """Check randomk's arguments and return them as ints."""
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__} {n!r}") from None
    if not 0 <= n <= MAX_ELEMENTS:
        raise ValueError(f"n must satisfy 0 <= n <= 2**32 (indices are uint32), got n = {n}")
    k = _check_k(k, n)
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(
            f"seed must be an integer (a uint64 announced by the server), got {type(seed).__name__}"
            f" {seed!r}"
        ) from None
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must satisfy 0 <= seed < 2**64, got seed = {seed}")
    return n, k, seed


def _check_no_overlap(residual, update):
    """Reject an update that aliases the residual it is added into."""
    if np.may_share_memory(residual, update):
        raise ValueError(
            "update shares memory with residual; topk_ef_ adds update into residual in place, "
            "so pass a separate array (update.copy())"
        )


def _raise_non_finite(values, name):
    """Raise the ValueError for the first non-finite entry of the flat float array ``values``."""
    i = int(np.flatnonzero(~np.isfinite(values))[0])
    raise ValueError(
        f"{name} is not finite at flat index {i} (value {values[i]}); selection by "
        "magnitude needs finite values, so check the training step that produced them"
    )


def _raise_non_finite_sum(residual, update):
    """Raise the ValueError for the first index where ``residual + update`` is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is what we report
        total = residual + update
    i = int(np.flatnonzero(~np.isfinite(total))[0])
    raise ValueError(
        f"residual + update is not finite at flat index {i} (residual {residual[i]}, update "
        f"{update[i]}); residual is left unchanged. Check the update for NaN/Inf or divergence"
    )


def _empty_selection():
    return np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.float32)


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
    """The k entries of ``x`` with the largest magnitude.

    Parameters
    ----------
    x : numpy.ndarray
        float32, C-contiguous, any shape (indices are into ``x.reshape(-1)``); may be read-only.
    k : int
        How many entries to select, ``0 <= k <= x.size``.

    Returns
    -------
    idx : numpy.ndarray
        uint32, shape (k,), sorted ascending. Among equal magnitudes the lower index is chosen;
        ``-0.0`` has magnitude 0.
    vals : numpy.ndarray
        float32, shape (k,), ``x.reshape(-1)[idx]`` (signs kept).

    Raises
    ------
    TypeError
        ``x`` is not a float32 ndarray, or ``k`` is not an integer.
    ValueError
        ``x`` is not C-contiguous, ``k`` is out of range, or ``x`` holds NaN or Inf.

    Notes
    -----
    Top-k of a clean update leaks which coordinates the local data moved. Under differential
    privacy, select only after noise has been added (post-processing), or use :func:`randomk`.
    """
    flat = _check_array(x, "x")
    k = _check_k(k, flat.shape[0])
    if not np.isfinite(flat).all():
        _raise_non_finite(flat, "x")
    idx = _select_topk(flat, k)
    return idx, flat[idx]


def topk_ef_(residual, update, k):
    """Top-k with error feedback: accumulate, select, emit, and keep the rest for the next round.

    ``residual += update``; the k entries of the new residual with the largest magnitude are
    returned, and zeroed in ``residual``, so whatever is not sent now is carried to the next
    update instead of being lost (error feedback, Seide et al. 2014; Stich et al. 2018).

    Parameters
    ----------
    residual : numpy.ndarray
        float32, C-contiguous, writeable; updated in place.
    update : numpy.ndarray
        float32, C-contiguous, same shape as ``residual``, not sharing memory with it.
    k : int
        How many entries to emit, ``0 <= k <= residual.size``.

    Returns
    -------
    idx : numpy.ndarray
        uint32, shape (k,), sorted ascending; ties in magnitude go to the lower index.
    vals : numpy.ndarray
        float32, shape (k,), the accumulated residual at ``idx`` before it was zeroed.

    Raises
    ------
    TypeError
        Wrong array types or dtypes, or ``k`` not an integer.
    ValueError
        Non-contiguous or read-only ``residual``, mismatched shapes, overlapping arrays, ``k`` out
        of range, or ``residual + update`` not finite anywhere. On any error ``residual`` is left
        unchanged.
    """
    r = _check_array(residual, "residual", writeable=True)
    u = _check_array(update, "update")
    if residual.shape != update.shape:
        raise ValueError(
            f"update has shape {update.shape} but residual has shape {residual.shape}; they must "
            "match element for element"
        )
    _check_no_overlap(residual, update)
    k = _check_k(k, r.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):  # reported just below, as a ValueError
        total = r + u
    if not np.isfinite(total).all():
        _raise_non_finite_sum(r, u)
    idx = _select_topk(total, k)
    vals = total[idx]
    total[idx] = 0.0
    r[...] = total
    return idx, vals


def threshold_select(x, tau):
    """Every entry of ``x`` whose magnitude exceeds ``tau``: send only the coordinates that moved.

    Parameters
    ----------
    x : numpy.ndarray
        float32, C-contiguous, any shape (indices are into ``x.reshape(-1)``); may be read-only.
    tau : float
        Finite, >= 0. Compared exactly, in double precision: ``abs(x) > tau``.

    Returns
    -------
    idx : numpy.ndarray
        uint32, sorted ascending.
    vals : numpy.ndarray
        float32, ``x.reshape(-1)[idx]``.

    Raises
    ------
    TypeError
        ``x`` is not a float32 ndarray, or ``tau`` is not a real number.
    ValueError
        ``x`` is not C-contiguous, ``tau`` is negative or not finite, or ``x`` holds NaN or Inf.
    """
    flat = _check_array(x, "x")
    tau = _check_tau(tau)
    if not np.isfinite(flat).all():
        _raise_non_finite(flat, "x")
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
    """k distinct coordinates out of n, sorted: the same on every device for the same seed.

    Random-k picks coordinates independently of the data, so sending them leaks nothing about
    it; the server announces ``seed`` and every device selects the same coordinates.

    Parameters
    ----------
    n : int
        Number of coordinates, ``0 <= n <= 2**32``.
    k : int
        How many to pick, ``0 <= k <= n``.
    seed : int
        A uint64, ``0 <= seed < 2**64``.

    Returns
    -------
    numpy.ndarray
        uint32, shape (k,), distinct, sorted ascending.

    Raises
    ------
    TypeError
        An argument is not an integer.
    ValueError
        An argument is out of range.

    Notes
    -----
    The algorithm, fixed so that a C device (or any language) reproduces it exactly; all
    arithmetic is on unsigned 64-bit integers, wrapping modulo 2**64:

    1. Generator: SplitMix64 with ``state = seed``. Each draw does
       ``state += 0x9E3779B97F4A7C15; z = state;
       z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
       return z ^ (z >> 31)``.
    2. Uniform integer in ``[0, m)`` without bias: draw ``z``; while ``z < 2**64 mod m`` (in C:
       ``(0 - m) % m``), draw again; return ``z % m``.
    3. Floyd's sampling (Bentley, CACM 1987): start with an empty set S; for
       ``j = n - k, ..., n - 1``: ``t = uniform(j + 1)``; if t is in S insert j, else insert t.
    4. Return the elements of S in ascending order.

    Every k-subset is equally likely. Not a cryptographic generator: the seed is public anyway.
    """
    n, k, seed = _check_randomk_args(n, k, seed)
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
