"""Discrete Laplace noise on a power-of-two grid, from a ChaCha20 keystream: the secure local mode.

Why not the float sampler
-------------------------
A floating-point Laplace sample added to a value leaves traces of that value in the low bits of
the sum: the set of floats ``x + noise`` can reach depends on ``x`` (Mironov, "On Significance of
the Least Significant Bits for Differential Privacy", CCS 2012). Here the update is first moved
onto a grid of spacing ``g = 2**k`` and the noise is an integer number of grid steps, so every
released value is an exact multiple of ``g`` (float32 holds them exactly while ``|value| / g``
stays below ``2**24``) and its bits carry nothing beyond the noised grid value.

The mechanism
-------------
For an L1-clipped update ``x`` (``||x||_1 <= C``), :func:`to_grid` truncates ``x / g`` towards zero
to integers ``k`` (so ``||k||_1 <= C / g``: truncation never grows a norm), and the device releases
``g * (k + Z)`` with ``Z`` i.i.d. discrete Laplace of parameter ``t``:
``P(Z = z) = (1 - e^(-1/t)) / (1 + e^(-1/t)) * e^(-|z| / t)``. Two devices' grid vectors differ by
at most ``2 C / g`` in L1 (replace-one adjacency), so ``t = 2 C / (g epsilon)`` makes the release
epsilon-DP under replace-one (the geometric mechanism, Ghosh, Roughgarden & Sundararajan 2009).

Sampling and its guarantee
--------------------------
``Z = G1 - G2`` with ``G1, G2`` i.i.d. geometric, ``P(G >= n) = e^(-n / t)``, drawn by inversion as
``floor(-t * log(U))`` from uniforms ``U = (m + 1) / 2**53`` whose 53-bit ``m`` come from a ChaCha20
keystream (``cryptography``'s implementation) under a fresh 256-bit key from the operating system
(``os.urandom``). What holds: the random bits are those of a cryptographic stream cipher, so
nobody who sees released updates can predict or reconstruct the noise; the outputs are exactly on
the grid. What is approximate: the inversion computes ``log`` in float64, so each geometric's pmf is
exact up to float64 rounding of ``log`` (relative error about 1e-16), and values of ``G`` above
``t * 53 ln 2`` (probability below ``2**-53``) are never drawn. This is not the exact
integer-arithmetic sampler of Canonne, Kamath & Steinke (NeurIPS 2020), whose cost per coordinate
would be too high on a device.
"""
from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

#: Grid steps per Laplace scale: the grid is the largest power of two at most scale / 1024, so the
#: truncation moves each coordinate by less than a thousandth of the noise's scale.
STEPS_PER_SCALE = 1024
#: float32 holds every integer multiple of a power of two up to this many grid steps exactly.
EXACT_STEPS = 1 << 24


class ChaChaUniforms:
    """Uniform floats in (0, 1] from a ChaCha20 keystream.

    Parameters
    ----------
    key : bytes, optional
        32 bytes. Without it a fresh key comes from ``os.urandom``; pass one only to reproduce a
        stream in a test (whoever knows the key knows the noise).
    """

    def __init__(self, key: bytes | None = None):
        key = os.urandom(32) if key is None else bytes(key)
        if len(key) != 32:
            raise ValueError(f"a ChaCha20 key has 32 bytes, got {len(key)}")
        # The 16-byte "nonce" of cryptography's ChaCha20 is the 64-bit block counter followed by
        # the 64-bit nonce; one key is used for one stream only, so zeros are fine for both.
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def uniforms(self, n: int) -> np.ndarray:
        """``n`` float64 values ``(m + 1) / 2**53``, ``m`` the top 53 bits of a keystream word."""
        words = np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53


def grid_for(scale: float) -> float:
    """The grid spacing ``2**k`` for Laplace scale ``scale``: the largest at most scale / 1024."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the noise scale must be positive and finite, got {scale!r}")
    return 2.0 ** math.floor(math.log2(scale / STEPS_PER_SCALE))


def to_grid(x: np.ndarray, grid: float) -> np.ndarray:
    """``x / grid`` truncated towards zero, as int64 grid steps (never a larger L1 norm)."""
    return np.trunc(np.asarray(x, np.float64) / grid).astype(np.int64)


def discrete_laplace(n: int, t: float, uniforms: ChaChaUniforms) -> np.ndarray:
    """``n`` i.i.d. discrete Laplace integers of parameter ``t`` (pmf proportional to e^(-|z|/t)).

    Raises
    ------
    ValueError
        If ``t`` is not positive and finite.
    """
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"the discrete Laplace parameter must be positive and finite, got {t!r}")
    u = uniforms.uniforms(2 * n)
    g = np.floor(-t * np.log(u)).astype(np.int64)  # two geometric draws per value
    return g[:n] - g[n:]


def discrete_laplace_pmf(z: np.ndarray, t: float) -> np.ndarray:
    """``P(Z = z)`` of the discrete Laplace distribution of parameter ``t``."""
    r = math.exp(-1.0 / t)
    return (1.0 - r) / (1.0 + r) * np.exp(-np.abs(np.asarray(z, np.float64)) / t)


def add_discrete_laplace_(x: np.ndarray, scale: float, uniforms: ChaChaUniforms) -> float:
    """Replace float32 ``x`` in place by ``g * (to_grid(x, g) + Z)``; return the grid ``g``.

    ``scale`` is the Laplace scale the noise should have in the update's units (``2 C / epsilon``
    for replace-one epsilon-DP after an L1 clip to ``C``); the grid is :func:`grid_for` of it and
    ``Z`` has parameter ``t = scale / g``.

    Raises
    ------
    ValueError
        If ``x`` is not a float32 array, or a noised value would need more than 2**24 grid steps
        (float32 would round it off the grid; raise the clip's scale or lower epsilon's).
    """
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32):
        raise ValueError("discrete Laplace noise is added to a float32 numpy array")
    grid = grid_for(scale)
    steps = to_grid(x.ravel(), grid) + discrete_laplace(x.size, scale / grid, uniforms)
    if steps.size and int(np.abs(steps).max()) >= EXACT_STEPS:
        raise ValueError(f"a noised value needs {int(np.abs(steps).max())} grid steps of {grid:g}, "
                         f"more than float32 holds exactly ({EXACT_STEPS}); the update is far "
                         "larger than its clip bound")
    x.reshape(-1)[:] = (steps.astype(np.float64) * grid).astype(np.float32)
    return grid
