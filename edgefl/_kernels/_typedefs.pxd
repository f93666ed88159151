# Shared C types for every edgefl kernel: edgefl works in float32, accumulates in double.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

ctypedef float float32_t
ctypedef double float64_t
ctypedef Py_ssize_t intp_t
