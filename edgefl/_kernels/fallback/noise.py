"""Differential-privacy noise added in place, in NumPy: the twin of the compiled ``noise`` kernels.

It consumes the Generator in the compiled kernels' documented order and rounds the same way, so
the same seed gives bit-identical noise on both backends: for ``laplace_`` the sign words
(``random_raw``, low 32 bits, least significant bit first, set means negative), then the float32
exponentials; each element becomes ``x + (+-(scale * E))`` in float32. The BitGenerator's lock
(re-entrant) is held across both draws so no other thread can interleave.
"""

import numpy as np

from edgefl._kernels.checks.arrays import writeable_float32
from edgefl._kernels.checks.noise import check_generator, check_scale
from edgefl._kernels.docs import document


def laplace_(x, scale, rng):
    flat = writeable_float32(x, "add noise to that array")
    b = check_scale(scale, "scale")
    check_generator(rng)
    n = flat.shape[0]
    with rng.bit_generator.lock:
        words = rng.bit_generator.random_raw((n + 31) // 32)
        noise = rng.standard_exponential(n, dtype=np.float32)
    negative = np.unpackbits(words.astype("<u4").view(np.uint8), count=n, bitorder="little")
    np.multiply(noise, b, out=noise)
    np.negative(noise, out=noise, where=negative.view(bool))
    flat += noise


def gaussian_(x, sigma, rng):
    flat = writeable_float32(x, "add noise to that array")
    s = check_scale(sigma, "sigma")
    check_generator(rng)
    noise = rng.standard_normal(flat.shape[0], dtype=np.float32)
    np.multiply(noise, s, out=noise)
    flat += noise


document(laplace_, gaussian_)
