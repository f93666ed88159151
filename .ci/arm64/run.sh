#!/usr/bin/env bash
# edgefl on aarch64, from an x86-64 Debian 12 host (root): what `make test-arm64` and
# `make wheels` run.
#
#   run.sh cross    cross-compile the kernels with gcc-aarch64-linux-gnu and check that their hot
#                   loops are NEON code (~1 min, no emulation)
#   run.sh wheel    build the aarch64 wheel on an emulated Cortex-A72 into dist/
#   run.sh test     cross, then wheel, then install that wheel where no compiler is left and
#                   run every test marked `cpu` (pytest -m cpu) on the emulated CPU
#
# Environment: QEMU_CPU (default cortex-a72, the Raspberry Pi 4's core; cortex-a76 for a Pi 5),
# PYTHON (the host Python with Cython and NumPy, default .venv/bin/python), EDGEFL_ARM64_CACHE
# (the cached emulated environment and the cross-compile headers, default /var/cache/edgefl/arm64),
# and for `test` any pytest arguments after the command (default: -m cpu -q and the test modules
# that use the marker).
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$PWD
HERE=$SRC/.ci/arm64
PYTHON=${PYTHON:-$SRC/.venv/bin/python}
CACHE_DIR=${EDGEFL_ARM64_CACHE:-/var/cache/edgefl/arm64}
export QEMU_CPU=${QEMU_CPU:-cortex-a72}

log() { echo "[arm64] $*" >&2; }
timed() { local start=$SECONDS; "$@"; log "$1 ${2:-}: $((SECONDS - start)) s"; }
[ "$(id -u)" = 0 ] || { log "needs root (apt, chroot, binfmt_misc)"; exit 1; }

apt_install() {
    local need=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
    [ ${#need[@]} -eq 0 ] && return
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

# The target's headers for the cross-compile: CPython's from Debian's libpython3.11-dev:arm64
# (unpacked, not installed), NumPy's and its libnpyrandom.a from the aarch64 wheel of the pinned
# version. Cached next to the emulated environment, per version.
cross_headers() {
    local numpy py dir=$CACHE_DIR/cross
    numpy=$(sed -n 's/^numpy==//p' "$HERE/requirements.txt")
    py=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    NUMPY_DIR=$dir/numpy-$numpy-aarch64
    PYTHON_DIR=$dir/libpython$py-dev-arm64
    mkdir -p "$dir"
    if [ ! -d "$NUMPY_DIR" ]; then
        rm -rf "$dir/dl" && mkdir "$dir/dl"
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
            --python-version "$py" --implementation cp -d "$dir/dl" "numpy==$numpy"
        "$PYTHON" -m zipfile -e "$dir"/dl/numpy-*.whl "$NUMPY_DIR.tmp" && mv "$NUMPY_DIR.tmp" "$NUMPY_DIR"
    fi
    if [ ! -d "$PYTHON_DIR" ]; then
        if ! dpkg --print-foreign-architectures | grep -qx arm64; then
            dpkg --add-architecture arm64
            apt-get update -qq
        fi
        rm -rf "$dir/dl" && mkdir "$dir/dl"
        (cd "$dir/dl" && apt-get download -qq "libpython$py-dev:arm64" 2>/dev/null)
        dpkg -x "$dir"/dl/libpython"$py"-dev_*_arm64.deb "$PYTHON_DIR.tmp" && mv "$PYTHON_DIR.tmp" "$PYTHON_DIR"
    fi
    rm -rf "$dir/dl"
}

cross() {
    apt_install gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu
    cross_headers
    local out
    out=$(mktemp -d)
    "$PYTHON" "$HERE/cross_compile.py" --python-include "$PYTHON_DIR" --numpy "$NUMPY_DIR" --out "$out"
    "$PYTHON" "$HERE/neon_check.py" "$out"
    rm -rf "$out"
}

# A fresh copy of the cached emulated environment for this run, with the mounts a chroot needs
# (no /sys: onnxruntime would read the host's x86 CPU description there and crash); removed on
# exit whatever happens.
ROOT=
cleanup() {
    [ -n "$ROOT" ] || return 0
    local m
    for m in ccache dev/pts dev proc; do
        mountpoint -q "$ROOT/$m" && { umount "$ROOT/$m" || umount -l "$ROOT/$m"; }
    done
    rm -rf --one-file-system "$ROOT"
}
trap cleanup EXIT

emulated_system() {
    mkdir -p "$CACHE_DIR"
    ROOT=$(mktemp -d "$CACHE_DIR/run.XXXXXX")
    rmdir "$ROOT"
    "$HERE/environment.sh" "$ROOT"
    mount -t proc proc "$ROOT/proc"
    mount --bind /dev "$ROOT/dev"
    mount --bind /dev/pts "$ROOT/dev/pts"
    # The emulated compiler's object cache outlives the run (a compile of the kernels takes
    # ~4 min under emulation; with unchanged sources the run reuses its objects).
    mkdir -p "$CACHE_DIR/ccache" "$ROOT/ccache"
    mount --bind "$CACHE_DIR/ccache" "$ROOT/ccache"
    mkdir -p "$ROOT/build/src" "$ROOT/build/check"
    # The checkout as git sees it (tracked and new files, nothing ignored: no host builds).
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/build/src"
    # The tests (and the specs some of them read) without the package next to them: they
    # import edgefl from the wheel.
    cp -r "$SRC/tests" "$SRC/docs" "$SRC/pyproject.toml" "$ROOT/build/check/"
    install -m 755 "$HERE/inner.sh" "$ROOT/build/inner.sh"
}

inside() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        TERM=dumb QEMU_CPU="$QEMU_CPU" TMPDIR=/tmp CCACHE_DIR=/ccache CCACHE_MAXSIZE=1G \
        /build/inner.sh "$@"
}

wheel() {
    inside wheel
    mkdir -p "$SRC/dist"
    cp "$ROOT"/build/wheelhouse/edgefl-*.whl "$SRC/dist/"
    log "aarch64 wheel: dist/$(basename "$ROOT"/build/wheelhouse/edgefl-*.whl)"
}

# Take the compiler out of this run's copy of the system (the cached one keeps it).
remove_compiler() {
    rm -f "$ROOT"/usr/bin/{cc,gcc,c89,c99,cpp,aarch64-linux-gnu-gcc,aarch64-linux-gnu-cpp}* \
        "$ROOT"/usr/lib/gcc/aarch64-linux-gnu/*/cc1 "$ROOT"/etc/alternatives/{cc,c89,c99,cpp}
}

case "${1:-}" in
cross)
    timed cross
    ;;
wheel)
    apt_install binutils-aarch64-linux-gnu
    timed emulated_system
    timed wheel
    "$PYTHON" "$HERE/neon_check.py" "$ROOT"/build/wheelhouse/edgefl-*.whl
    ;;
test)
    shift
    # Only the modules that use the marker are collected: the others may import what the
    # emulated system lacks (pyarrow), and collecting them costs a minute under emulation.
    [ $# -gt 0 ] || set -- -m cpu -q $(grep -l "mark\.cpu" tests/test_*.py)
    timed cross
    timed emulated_system
    timed wheel
    "$PYTHON" "$HERE/neon_check.py" "$ROOT"/build/wheelhouse/edgefl-*.whl
    remove_compiler
    inside install
    log "pytest $* on an emulated $QEMU_CPU"
    timed inside test "$@"
    ;;
*)
    echo "usage: $0 cross|wheel|test [pytest args]" >&2
    exit 2
    ;;
esac
