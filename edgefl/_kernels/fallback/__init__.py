"""Pure-NumPy twin of the compiled kernels.

Same names, signatures, validation and results as the Cython modules (exactly, for everything but
the SGD steps, which agree within float32 tolerance). It is the oracle the compiled kernels are
tested against, and the backend where no compiler exists (``EDGEFL_PUREPYTHON=1``).
"""
