"""Build edgefl's Cython kernels.

Portable by default: ``-O3`` with ``-fopenmp-simd`` so the compiler may vectorise the loops marked
``#pragma omp simd`` without pulling in an OpenMP runtime. Hot helpers that profit from AVX2 use
GCC's ``target_clones`` in their own C code, so one wheel still runs on every x86-64 CPU.

Environment switches
--------------------
EDGEFL_NATIVE=1
    Add ``-march=native``: faster on the build machine, crashes on older CPUs. Opt-in only.
EDGEFL_DEBUG_KERNELS=1
    Turn Cython's bounds and initialisation checks back on (for a debugging test run). Its C files
    go to ``build/cython-debug``; ``make test-debug-kernels`` builds it into
    ``build/debug-kernels`` (``--build-lib``) and runs the kernel tests against it.
EDGEFL_PUREPYTHON=1
    Build no extension: install the pure-NumPy twin only (a device without a C compiler).

A kernel that fails to compile does not fail the install either (the extensions are optional,
as in msgpack): edgefl then runs on the NumPy twin and says so when ``edgefl.kernels`` is
imported. ``make test`` checks that the compiled backend is the one in use.
"""
import os
import sys
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent
KERNELS = HERE / "edgefl" / "_kernels"
DEBUG = os.environ.get("EDGEFL_DEBUG_KERNELS") == "1"

extra_compile_args = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-Wno-unused-function"]
if os.environ.get("EDGEFL_NATIVE") == "1":
    extra_compile_args.append("-march=native")
if sys.platform == "win32":
    extra_compile_args = ["/O2"]

# NumPy ships its random C API as a static library next to its headers.
numpy_random_lib = str(Path(np.get_include()).parent.parent / "random" / "lib")

define_macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]


def kernel(name, *, random=False):
    """One extension module per kernel concept: edgefl._kernels.<name>."""
    return Extension(
        f"edgefl._kernels.{name}",
        sources=[str((KERNELS / f"{name}.pyx").relative_to(HERE))],
        include_dirs=[np.get_include(), str(KERNELS)],
        library_dirs=[numpy_random_lib] if random else [],
        libraries=(["npyrandom", "m"] if random else ["m"]) if sys.platform != "win32" else [],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
    )


extensions = [
    kernel("clip"),
    kernel("noise", random=True),
    kernel("topk"),
    kernel("codec"),
    kernel("sgd", random=True),  # the epoch loop shuffles with NumPy's random_interval
]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

def compiled_kernels():
    """The extensions to build: none with EDGEFL_PUREPYTHON=1, else every kernel, optional."""
    if os.environ.get("EDGEFL_PUREPYTHON") == "1":
        return []
    # The bounds-checking build writes its C files apart, so it never replaces the normal build's.
    modules = cythonize(extensions, compiler_directives=directives, quiet=True,
                        build_dir=str(HERE / "build" / "cython-debug") if DEBUG else None)
    for module in modules:
        module.optional = True  # set after cythonize, which does not carry it over
    return modules


# Run as a script (pip and setuptools' build backend do): imported, this module only describes
# the kernels, for the aarch64 cross-compile check (.ci/arm64/cross_compile.py).
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["edgefl", "edgefl.*"])
        + ["edgefl_server"]
        + [f"edgefl_server.{p}" for p in find_packages(where="server")],
        package_dir={"edgefl_server": "server"},
        package_data={"edgefl._kernels": ["*.pxd", "*.pyx", "*.h"]},
        ext_modules=compiled_kernels(),
    )
