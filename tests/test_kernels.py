"""edgefl.kernels: the backend a session asks for is the one in use, with every public name."""
import os
import sys
from pathlib import Path

import pytest

from backends import COMPILED, TWIN
from edgefl import kernels

pytestmark = pytest.mark.backend

PUREPYTHON = os.environ.get("EDGEFL_PUREPYTHON", "") not in ("", "0")


def test_the_active_backend_is_the_one_the_environment_selects():
    expected = TWIN if PUREPYTHON else COMPILED
    assert kernels.BACKEND == expected.BACKEND == ("numpy" if PUREPYTHON else "cython")
    for name in kernels.__all__:
        assert getattr(kernels, name) is getattr(expected, name), name


def test_the_two_backends_are_different_code_with_the_same_names():
    names = [n for n in kernels.__all__ if n != "BACKEND"]
    assert len(names) == 20
    for name in names:
        compiled, twin = getattr(COMPILED, name), getattr(TWIN, name)
        assert compiled is not twin, name
        assert compiled.__module__.startswith("edgefl._kernels.")
        assert twin.__module__.startswith("edgefl._kernels.fallback.")


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be 'cython' or 'numpy', got 'fortran'"):
        kernels.load_backend("fortran")


@pytest.mark.kernels
def test_a_debug_session_runs_the_bounds_checking_build():
    """With EDGEFL_DEBUG_KERNELS=1 (make test-debug-kernels) the compiled kernels come from
    build/debug-kernels; otherwise from the package itself."""
    debug = os.environ.get("EDGEFL_DEBUG_KERNELS") == "1"
    for name in ("clip_l2_", "laplace_", "topk", "encode_indices", "mlp_sgd_step_"):
        module = sys.modules[getattr(COMPILED, name).__module__]
        assert ("debug-kernels" in Path(module.__file__).parts) == debug, module.__file__


def test_every_public_kernel_is_documented_once_for_both_backends():
    from edgefl._kernels.docs import DOCS

    for name in kernels.__all__:
        if name == "BACKEND":
            continue
        assert "Parameters\n----------" in DOCS[name] or name == "SGDState", name
        assert getattr(TWIN, name).__doc__ == DOCS[name], name
        if name != "SGDState":  # a cdef class's docstring cannot be assigned
            assert getattr(COMPILED, name).__doc__ == DOCS[name], name
    assert 'DOCS["SGDState"]' in COMPILED.SGDState.__doc__
