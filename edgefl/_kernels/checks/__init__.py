"""The argument checks and error messages of the public kernels, one set for both backends.

Plain Python that the compiled modules and their NumPy twin (:mod:`edgefl._kernels.fallback`)
both import: a compiled kernel tests the common case in C and calls these checks when it fails,
or before its ``with nogil:`` block, so both backends reject a bad argument with the same
exception and the same words. One module per kernel module, plus :mod:`.arrays`.
"""
