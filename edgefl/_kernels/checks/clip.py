"""The arguments of clip_l2_ / clip_l1_: the bound, and a non-finite x named by its index.

Shared by the compiled module and its NumPy twin, so both reject the same arguments with the
same words.
"""
from __future__ import annotations

import math

import numpy as np



def check_bound(max_norm):
    if isinstance(max_norm, (str, bytes, bytearray)):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}")
    try:
        bound = float(max_norm)
    except (TypeError, ValueError):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}") from None
    if not (math.isfinite(bound) and bound > 0.0):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm!r}")
    return bound


def raise_non_finite(flat):
    i = int(np.flatnonzero(~np.isfinite(flat))[0])
    raise ValueError(
        f"x contains a non-finite value ({flat[i]} at flat index {i}); x is left unchanged. "
        "Clip only finite updates: check the training step that produced it"
    )
