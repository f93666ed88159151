"""The arguments of laplace_ / gaussian_: a positive float32 scale, a numpy Generator.

Shared by the compiled module and its NumPy twin, so both reject the same arguments with the
same words.
"""
from __future__ import annotations

import math

import numpy as np



def check_scale(value, name):
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    with np.errstate(over="ignore"):
        v32 = np.float32(v)
    if not (math.isfinite(v32) and v32 > 0):
        raise ValueError(
            f"{name} must be finite and > 0 in float32 (about 1.2e-38 to 3.4e38), got {value!r}"
        )
    return v32


def check_generator(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
