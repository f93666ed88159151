"""Differential-privacy noise added in place, in NumPy: the twin of the compiled ``noise`` kernels.

It consumes the Generator in the compiled kernels' documented order and rounds the same way, so
the same seed gives bit-identical noise on both backends: for ``laplace_`` the sign words
(``random_raw``, low 32 bits, least significant bit first, set means negative), then the float32
exponentials; each element becomes ``x + (+-(scale * E))`` in float32. The BitGenerator's lock
(re-entrant) is held across both draws so no other thread can interleave.
"""
import math

import numpy as np

from edgefl._kernels.fallback.arrays import writeable_float32


def _check_scale(value, name):
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


def _check_generator(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )


def laplace_(x, scale, rng):
    """Add i.i.d. Laplace(0, ``scale``) noise to ``x`` in place.

    Parameters
    ----------
    x : numpy.ndarray
        float32, C-contiguous, writeable, any shape.
    scale : float
        The Laplace scale b; finite and > 0 in float32. For epsilon-DP after ``clip_l1_`` with
        bound C, ``b = C / epsilon``.
    rng : numpy.random.Generator
        Source of randomness; the same seed gives the same noise on both backends.

    Raises
    ------
    TypeError
        ``x`` is not a float32 ndarray, ``scale`` is not a number, or ``rng`` is not a Generator.
    ValueError
        ``x`` is non-contiguous or read-only, or ``scale`` is not finite and positive.
    """
    flat = writeable_float32(x, "add noise to that array")
    b = _check_scale(scale, "scale")
    _check_generator(rng)
    n = flat.shape[0]
    with rng.bit_generator.lock:
        words = rng.bit_generator.random_raw((n + 31) // 32)
        noise = rng.standard_exponential(n, dtype=np.float32)
    negative = np.unpackbits(words.astype("<u4").view(np.uint8), count=n, bitorder="little")
    np.multiply(noise, b, out=noise)
    np.negative(noise, out=noise, where=negative.view(bool))
    flat += noise


def gaussian_(x, sigma, rng):
    """Add i.i.d. N(0, ``sigma**2``) noise to ``x`` in place.

    Parameters
    ----------
    x : numpy.ndarray
        float32, C-contiguous, writeable, any shape.
    sigma : float
        The standard deviation; finite and > 0 in float32.
    rng : numpy.random.Generator
        Source of randomness; the same seed gives the same noise on both backends.

    Raises
    ------
    TypeError
        ``x`` is not a float32 ndarray, ``sigma`` is not a number, or ``rng`` is not a Generator.
    ValueError
        ``x`` is non-contiguous or read-only, or ``sigma`` is not finite and positive.
    """
    flat = writeable_float32(x, "add noise to that array")
    s = _check_scale(sigma, "sigma")
    _check_generator(rng)
    noise = rng.standard_normal(flat.shape[0], dtype=np.float32)
    np.multiply(noise, s, out=noise)
    flat += noise
