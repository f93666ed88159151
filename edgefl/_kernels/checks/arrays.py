"""Argument checks shared by the in-place kernels of both backends.

The compiled modules test the common case (native float32, C-contiguous, writeable) in C and call
these checks only when it fails, so both backends reject a bad array with the same words.
"""
import numpy as np


def writeable_float32(x, action: str):
    """``x`` flattened, if it is a writeable C-contiguous float32 ndarray; else a clear error.

    ``action`` finishes the advice, e.g. ``"clip that array"``, ``"add noise to that array"``.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray of float32, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(
            f"x must have dtype float32, got {x.dtype}; convert it first "
            f"(x = x.astype(np.float32)) and {action}"
        )
    if not x.flags.c_contiguous:
        raise ValueError(
            f"x must be C-contiguous (strides {x.strides}); in-place kernels never copy, so pass "
            "x = np.ascontiguousarray(x) and use that array"
        )
    if not x.flags.writeable:
        raise ValueError(f"x is read-only; the kernel works in place, so pass a writeable array "
                         f"(x.copy()) and {action}")
    return x.reshape(-1)
