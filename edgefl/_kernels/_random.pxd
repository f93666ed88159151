# NumPy's random C API, declared here rather than cimported from numpy.random: numpy/random's own
# .pxd files cimport its BitGenerator classes, so every module using them would import the whole
# numpy.random package when it loads (5-15 ms of a device's start-up) instead of when a kernel
# first takes a Generator. The declarations match numpy/random/bitgen.h and distributions.h.
from libc.stdint cimport uint32_t, uint64_t

from edgefl._kernels._typedefs cimport intp_t


cdef extern from "numpy/random/bitgen.h":
    struct bitgen:
        void *state
        uint64_t (*next_uint64)(void *st) nogil
        uint32_t (*next_uint32)(void *st) nogil
        double (*next_double)(void *st) nogil
        uint64_t (*next_raw)(void *st) nogil

    ctypedef bitgen bitgen_t


cdef extern from "numpy/random/distributions.h":
    void random_standard_exponential_fill_f(bitgen_t *bitgen_state, intp_t cnt, float *out) nogil
    void random_standard_normal_fill_f(bitgen_t *bitgen_state, intp_t count, float *out) nogil
    uint64_t random_interval(bitgen_t *bitgen_state, uint64_t max) nogil
