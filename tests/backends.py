"""Both kernel backends side by side, whatever ``EDGEFL_PUREPYTHON`` says.

Kernel tests name the backend they check: a comparison takes :data:`COMPILED` and the twin
module explicitly (so it can fail: under ``EDGEFL_PUREPYTHON=1`` ``edgefl.kernels`` *is* the
twin), a property of the kernels runs on both (:data:`both_backends`).
"""
import pytest

from edgefl import kernels

COMPILED = kernels.load_backend("cython")
TWIN = kernels.load_backend("numpy")

#: Parametrize a test over both backends as its argument ``K``.
both_backends = pytest.mark.parametrize("K", [COMPILED, TWIN], ids=["compiled", "twin"])
