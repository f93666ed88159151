#!/usr/bin/env bash
# The emulated aarch64 environment: a Debian 12 (bookworm) arm64 root filesystem with Python 3.11,
# gcc 12 and Mosquitto, plus /opt/venv holding the pinned Python packages of requirements.txt.
# Run on an x86-64 Debian host as root; every aarch64 binary runs under qemu-user (binfmt_misc).
#
#   environment.sh DEST     unpack a fresh copy of the environment into DEST (must not exist)
#
# Building it takes ~20 min on two loaded cores, so it is cached as one zstd tarball:
#   $EDGEFL_ARM64_CACHE/env-<key>.tar.zst      (default cache: /var/cache/edgefl/arm64)
# <key> hashes everything the environment is made from: the Debian release, the package list,
# requirements.txt and this file. Any change builds a new tarball (and drops the stale ones);
# with a warm cache a run only unpacks it (~30 s).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=bookworm                       # Python 3.11, gcc 12: what Raspberry Pi OS 12 ships
PACKAGES=python3,python3-venv,python3-dev,gcc,libc6-dev,ccache,ca-certificates,mosquitto
CACHE_DIR=${EDGEFL_ARM64_CACHE:-/var/cache/edgefl/arm64}
# The Debian mirror the host itself uses (deb822 sources), unless given.
MIRROR=${EDGEFL_DEBIAN_MIRROR:-$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

log() { echo "[arm64-env] $*" >&2; }

environment_key() {
    { echo "$SUITE"; echo "$PACKAGES"; cat "$HERE/requirements.txt" "$HERE/environment.sh"; } \
        | sha256sum | cut -c1-16
}

# The emulator, its kernel registration and the rootfs builder. qemu-user-static is statically
# linked and registered with the F (fix-binary) flag, so it need not exist inside the rootfs and
# every subprocess there (pip, gcc, pytest's children, mosquitto) runs emulated transparently.
host_tools() {
    local need=() p
    for p in qemu-user-static binfmt-support mmdebstrap zstd; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    [ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || { log "qemu-aarch64 is not registered with binfmt_misc"; exit 1; }
    grep -q 'flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || { log "qemu-aarch64 lacks binfmt_misc's F flag: chroot cannot run aarch64 binaries"; exit 1; }
}

# Mounts a chroot needs, undone by unmount_chroot. /sys is left out on purpose: onnxruntime's
# cpuinfo reads the host's x86 CPU topology there and crashes on import; without /sys it
# falls back to /proc. The host's CA bundle goes in for pip (a TLS-inspecting proxy's CA is
# trusted only by the host).
mount_chroot() {
    local root=$1
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    mount --bind /dev/pts "$root/dev/pts"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca.crt"
    chmod 1777 "$root/tmp"
}
unmount_chroot() {
    local root=$1 m
    for m in dev/pts dev proc; do
        mountpoint -q "$root/$m" && { umount "$root/$m" || umount -l "$root/$m"; }
    done
    return 0
}

build_environment() {
    local tarball=$1 stage
    stage=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
    # shellcheck disable=SC2064
    trap "unmount_chroot '$stage/rootfs'; rm -rf '$stage'" EXIT
    log "building the $SUITE arm64 rootfs from $MIRROR (~15 min)"
    # mmdebstrap resolves and unpacks with the host's apt; only the maintainer scripts run
    # emulated (debootstrap --foreign runs its whole second stage under qemu and stalls).
    mmdebstrap --quiet --arch=arm64 --variant=apt --include="$PACKAGES" "$SUITE" "$stage/rootfs" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
        "deb ${MIRROR%/debian*}/debian-security $SUITE-security main"
    mount_chroot "$stage/rootfs"
    cp "$HERE/requirements.txt" "$stage/rootfs/tmp/requirements.txt"
    log "installing the pinned aarch64 wheels into /opt/venv (~5 min)"
    chroot "$stage/rootfs" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8 \
        PIP_CERT=/etc/ssl/host-ca.crt SSL_CERT_FILE=/etc/ssl/host-ca.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 /bin/sh -euc '
            python3 -m venv /opt/venv
            /opt/venv/bin/pip install -q --no-cache-dir --only-binary=:all: -r /tmp/requirements.txt
            /opt/venv/bin/pip freeze > /opt/venv/frozen-requirements.txt
            rm /tmp/requirements.txt'
    unmount_chroot "$stage/rootfs"
    rm -f "$stage/rootfs/etc/ssl/host-ca.crt"
    log "packing the environment"
    tar --zstd -cpf "$stage/env.tar.zst" -C "$stage/rootfs" .
    mv "$stage/env.tar.zst" "$tarball"
    rm -rf "$stage"
    trap - EXIT
}

main() {
    local dest=${1:?usage: environment.sh DEST} key tarball old
    [ "$(id -u)" = 0 ] || { log "needs root (chroot, mounts, binfmt_misc)"; exit 1; }
    [ ! -e "$dest" ] || { log "$dest exists"; exit 1; }
    host_tools
    mkdir -p "$CACHE_DIR"
    key=$(environment_key)
    tarball=$CACHE_DIR/env-$key.tar.zst
    # One builder at a time; a second run waits and then finds the tarball.
    exec 9>"$CACHE_DIR/.lock"
    flock 9
    if [ -e "$tarball" ]; then
        log "cached environment $key"
    else
        log "no cached environment for key $key"
        build_environment "$tarball"
        for old in "$CACHE_DIR"/env-*.tar.zst; do
            [ "$old" = "$tarball" ] || rm -f "$old"
        done
    fi
    mkdir -p "$dest"
    tar --zstd -xpf "$tarball" -C "$dest"
    flock -u 9
}

main "$@"
