"""The arguments of the top-k family: arrays, k, tau, randomk's n/k/seed, overlap, non-finite input.

Shared by the compiled module and its NumPy twin, so both reject the same arguments with the
same words.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np



#: Indices are uint32 on the wire, so an array may hold at most this many elements.
MAX_ELEMENTS = 1 << 32


def check_array(x, name, *, writeable=False):
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


def check_k(k, n, name="k"):
    """Check that ``k`` is an integer with ``0 <= k <= n`` and return it as an int."""
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(k).__name__} {k!r}") from None
    if not 0 <= k <= n:
        raise ValueError(f"{name} must satisfy 0 <= {name} <= n = {n}, got {name} = {k}")
    return k


def check_tau(tau):
    """Check that ``tau`` is a finite real number >= 0 and return it as a float."""
    if not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__} {tau!r}")
    value = float(tau)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"tau must be finite and >= 0, got {tau!r}")
    return value


#: The largest seed: seeds are uint64.
_MASK64 = (1 << 64) - 1


def check_randomk_args(n, k, seed):
    """Check randomk's arguments and return them as ints."""
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__} {n!r}") from None
    if not 0 <= n <= MAX_ELEMENTS:
        raise ValueError(f"n must satisfy 0 <= n <= 2**32 (indices are uint32), got n = {n}")
    k = check_k(k, n)
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


def check_no_overlap(residual, update):
    """Reject an update that aliases the residual it is added into."""
    if np.may_share_memory(residual, update):
        raise ValueError(
            "update shares memory with residual; topk_ef_ adds update into residual in place, "
            "so pass a separate array (update.copy())"
        )


def raise_non_finite(values, name):
    """Raise the ValueError for the first non-finite entry of the flat float array ``values``."""
    i = int(np.flatnonzero(~np.isfinite(values))[0])
    raise ValueError(
        f"{name} is not finite at flat index {i} (value {values[i]}); selection by "
        "magnitude needs finite values, so check the training step that produced them"
    )


def raise_non_finite_sum(residual, update):
    """Raise the ValueError for the first index where ``residual + update`` is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is what we report
        total = residual + update
    i = int(np.flatnonzero(~np.isfinite(total))[0])
    raise ValueError(
        f"residual + update is not finite at flat index {i} (residual {residual[i]}, update "
        f"{update[i]}); residual is left unchanged. Check the update for NaN/Inf or divergence"
    )


def empty_selection():
    return np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.float32)


def check_error_feedback_arrays(residual, update):
    """``(residual, update)`` of topk_ef_ flattened: same shape, residual writeable, no overlap."""
    r = check_array(residual, "residual", writeable=True)
    u = check_array(update, "update")
    if residual.shape != update.shape:
        raise ValueError(
            f"update has shape {update.shape} but residual has shape {residual.shape}; they must "
            "match element for element"
        )
    check_no_overlap(residual, update)
    return r, u
