"""Compiled kernels (Cython) and their pure-NumPy twin (:mod:`edgefl._kernels.fallback`).

Import the public API from :mod:`edgefl.kernels`, which picks the backend.
"""
