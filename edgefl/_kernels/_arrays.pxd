# The in-place kernels' array check, shared by the compiled modules: the common case in C, the
# shared check (edgefl._kernels.checks.arrays) for the words of the error.
cimport numpy as cnp


cdef inline cnp.ndarray writeable_float32_fast(object x, str action):
    """``x`` if it is a native, aligned, C-contiguous, writeable float32 ndarray; else raise."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(x):
        a = <cnp.ndarray>x
        if (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 and cnp.PyArray_ISCARRAY(a)
                and cnp.PyArray_ISNOTSWAPPED(a)):
            return a
    from edgefl._kernels.checks.arrays import writeable_float32

    writeable_float32(x, action)  # raises, naming what is wrong, as the twin does too
    raise ValueError("x must be aligned; pass x = x.copy() and use that array")
