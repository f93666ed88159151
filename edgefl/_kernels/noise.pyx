"""Differential-privacy noise added in place, drawn through NumPy's BitGenerator C API.

``laplace_`` adds i.i.d. Laplace(0, scale) noise and ``gaussian_`` i.i.d. N(0, sigma**2) noise to
a float32 array. The caller passes a ``numpy.random.Generator``: its BitGenerator is used through
its capsule while its lock is held, so a run is reproducible from a seed (spawn one Generator per
device or round from a ``SeedSequence``) and never races with another user of the same Generator.

Laplace(0, b) is drawn as ``b * S * E`` with a random sign S and E ~ Exp(1) from NumPy's float32
ziggurat: one random bit and one cheap exponential per element instead of NumPy's float64
``log``-based sampler, which runs at the speed of the exponential fill itself.

Consumption order (the NumPy twin follows it, so both give bit-identical noise)
---------------------------------------------------------------------------------
``laplace_`` over n elements first takes ``ceil(n / 32)`` raw draws (``bit_generator.random_raw``)
whose low 32 bits are the sign bits, least significant first (bit set: negative), then n
exponentials (``Generator.standard_exponential(n, dtype=np.float32)``). Each element becomes
``x + (-(b * E) if sign else b * E)`` in float32, rounded after the multiply and after the add.
``gaussian_`` takes n normals (``Generator.standard_normal(n, dtype=np.float32)``) and adds
``sigma * Z`` the same way.

Privacy
-------
Laplace noise is calibrated to L1 sensitivity: clip with :func:`edgefl.kernels.clip_l1_` to bound
C and use ``scale = C / epsilon``. Gaussian noise goes with L2 clipping. Both are floating-point
samplers, attackable through the gaps in their output (Mironov, CCS 2012); they are not the
secure mode (a CSPRNG seed with snapping or discrete noise at a power-of-two granularity).
"""
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.math cimport isfinite

import numpy as np


from edgefl._kernels._arrays cimport writeable_float32_fast
from edgefl._kernels.checks.noise import check_generator, check_scale
from edgefl._kernels._random cimport (
    bitgen_t,
    random_standard_exponential_fill_f,
    random_standard_normal_fill_f,
)
from edgefl._kernels._typedefs cimport float32_t, float64_t, intp_t, uint32_t
from edgefl._kernels.noise cimport edgefl_add_scaled, edgefl_add_signed_scaled
from edgefl._kernels.docs import document

cnp.import_array()

# Draws per refill of the on-stack buffer: small enough for L1, a multiple of 32 so that each
# chunk starts on a whole word of sign bits.
cdef enum:
    CHUNK = 2048


cdef bitgen_t *_bitgen(object rng) except NULL:
    check_generator(rng)
    capsule = rng.bit_generator.capsule
    if not PyCapsule_IsValid(capsule, "BitGenerator"):
        raise TypeError("rng.bit_generator does not expose a valid BitGenerator capsule")
    return <bitgen_t *>PyCapsule_GetPointer(capsule, "BitGenerator")


def laplace_(x, scale, rng):
    cdef cnp.ndarray a = writeable_float32_fast(x, "add noise to that array")
    cdef float32_t b = check_scale(scale, "scale")
    cdef bitgen_t *bitgen = _bitgen(rng)
    cdef intp_t n = cnp.PyArray_SIZE(a)
    cdef float32_t *data = <float32_t *>cnp.PyArray_DATA(a)
    cdef intp_t n_words = (n + 31) // 32
    cdef cnp.ndarray signs = np.empty(n_words, dtype=np.uint32)
    cdef uint32_t *sign_words = <uint32_t *>cnp.PyArray_DATA(signs)
    cdef float32_t draws[CHUNK]
    cdef intp_t i, start, m
    with rng.bit_generator.lock, nogil:
        for i in range(n_words):
            sign_words[i] = <uint32_t>bitgen.next_raw(bitgen.state)
        start = 0
        while start < n:
            m = n - start if n - start < CHUNK else CHUNK
            random_standard_exponential_fill_f(bitgen, m, draws)
            edgefl_add_signed_scaled(data + start, draws, sign_words + start // 32, m, b)
            start += m


def gaussian_(x, sigma, rng):
    cdef cnp.ndarray a = writeable_float32_fast(x, "add noise to that array")
    cdef float32_t s = check_scale(sigma, "sigma")
    cdef bitgen_t *bitgen = _bitgen(rng)
    cdef intp_t n = cnp.PyArray_SIZE(a)
    cdef float32_t *data = <float32_t *>cnp.PyArray_DATA(a)
    cdef float32_t draws[CHUNK]
    cdef intp_t start, m
    with rng.bit_generator.lock, nogil:
        start = 0
        while start < n:
            m = n - start if n - start < CHUNK else CHUNK
            random_standard_normal_fill_f(bitgen, m, draws)
            edgefl_add_scaled(data + start, draws, m, s)
            start += m


document(laplace_, gaussian_)
