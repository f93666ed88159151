#!/bin/bash
# Runs inside the emulated aarch64 Debian (run.sh copies it to /build): every binary here is an
# aarch64 one, executed by qemu-user on the CPU named by QEMU_CPU.
#
#   inner.sh wheel           build the edgefl wheel from /build/src with the rootfs's gcc 12 (the
#                            one compile of the kernels), auditwheel-repaired into /build/wheelhouse
#   inner.sh install         with no C compiler left: install that wheel into /opt/venv and check
#                            that the compiled kernels, not the NumPy twin, are in use
#   inner.sh test ARGS...    pytest in /build/check (the tests alone: edgefl comes from the wheel)
set -euo pipefail
export LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
V=/opt/venv

case "${1:-}" in
wheel)
    rm -rf /build/dist /build/wheelhouse
    # The emulated compile is the slow part of the run (~4 min on two loaded cores): both cores
    # (setuptools reads the extra config named by DIST_EXTRA_CONFIG), and no debug information
    # (GCC guarantees that -g changes no generated code; it slows the compile, swells the wheel).
    # ccache (its cache is kept by run.sh) returns the objects of unchanged sources.
    printf '[build_ext]\nparallel = 2\n' > /tmp/build-parallel.cfg
    export DIST_EXTRA_CONFIG=/tmp/build-parallel.cfg CFLAGS=-g0 CC="ccache gcc"
    ccache --zero-stats >/dev/null
    # No build isolation: the pinned build tools are in the venv, and PyPI is not needed.
    $V/bin/pip wheel -q --no-deps --no-build-isolation -w /build/dist /build/src
    ccache --show-stats | grep -iE "hits|misses" || true
    # The manylinux tag this build earns (glibc symbol versions of the rootfs's Debian 12);
    # nothing to graft: the kernels link only libc and libm.
    $V/bin/auditwheel repair -w /build/wheelhouse /build/dist/edgefl-*.whl
    ;;
install)
    for cc in cc gcc c99 aarch64-linux-gnu-gcc; do
        if command -v "$cc" >/dev/null; then echo "a C compiler is still present: $cc" >&2; exit 1; fi
    done
    $V/bin/pip install -q --no-deps --force-reinstall /build/wheelhouse/edgefl-*.whl
    cd /  # away from any source tree: the import must find the installed wheel
    $V/bin/python - <<'EOF'
import platform
import edgefl.kernels as K
assert platform.machine() == "aarch64", platform.machine()
assert "/opt/venv/" in K.__file__, K.__file__
assert K.BACKEND == "cython", f"the wheel's compiled kernels did not import: {K.BACKEND}"
print(f"edgefl wheel installed without a compiler: {platform.machine()}, kernels {K.BACKEND}")
EOF
    ;;
test)
    shift
    cd /build/check
    exec $V/bin/python -m pytest "$@"
    ;;
*)
    echo "usage: $0 wheel|install|test [pytest args]" >&2
    exit 2
    ;;
esac
