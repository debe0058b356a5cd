#!/usr/bin/env bash
# The test suite on aarch64, emulated: a Debian arm64 root under qemu-user, on an x86-64 host.
#
#   sudo scripts/aarch64_emulated.sh [pytest args]        (default: the whole suite, -q)
#   env: ROOTFS=/opt/refimpl-arm64 (the arm64 root, made once and reused), SUITE=bookworm,
#        MIRROR=<a Debian mirror URL> (default: debootstrap's own), PYTHON=python3 (the host's,
#        with pip: it downloads the arm64 wheels, so the emulated pip needs no network)
#
# What it checks: the package builds with the aarch64 compiler (no x86 intrinsics leak into the
# portable path, the generic-timer counter `cntvct_el0` and CNTFRQ_EL0 read), and every test
# passes there: kernels against the oracle, the harness on a counter that ticks at tens of MHz
# (overhead 0 ticks, core/tick ~60 under qemu).  Timing figures under emulation mean nothing;
# tests that time an add chain against itself can flake there.  torch, transformers and
# matplotlib are not installed, so their cross-checks skip (do not set CI=1).
#
# Needs root (debootstrap, chroot, binfmt_misc), apt (qemu-user-static, binfmt-support,
# debootstrap) and about 1.5 GB.  Steps:
# 1. mounts binfmt_misc if needed and installs qemu-user-static, binfmt-support, debootstrap;
# 2. makes the arm64 root with python3, gcc and the Debian python3-dev (once);
# 3. downloads arm64 wheels of numpy, numba, cffi, rich, threadpoolctl, safetensors, pytest,
#    hypothesis with the host's pip, installs them in a venv inside the root (/v), offline;
# 4. copies the working tree (no .git, no built .so) to /src in the root, builds the native
#    modules with the arm64 gcc, installs the package there (-e, for the pytest plugin), and runs
#    pytest.  Exit status: pytest's.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOTFS=${ROOTFS:-/opt/refimpl-arm64}
SUITE=${SUITE:-bookworm}
PY=${PYTHON:-python3}

if [[ $(id -u) -ne 0 ]]; then
    echo "aarch64_emulated.sh: needs root (debootstrap, chroot, binfmt_misc)" >&2
    exit 2
fi
[[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if ! command -v debootstrap >/dev/null || [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap
    update-binfmts --enable qemu-aarch64 || true
fi

if [[ ! -x "$ROOTFS/usr/bin/gcc" ]]; then
    # debootstrap may leave python3-cffi unconfigured (python3-ply missing): mended below
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-dev,gcc,libc6-dev,python3-ply \
        "$SUITE" "$ROOTFS" ${MIRROR:+"$MIRROR"} || true
    chroot "$ROOTFS" dpkg --configure -a
fi
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"

wheels="$ROOTFS/wh"
mkdir -p "$wheels"
"$PY" -m pip download -q --only-binary=:all: --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    --python-version 3.11 --implementation cp -d "$wheels" \
    numpy numba cffi rich threadpoolctl safetensors pytest hypothesis "setuptools>=68" wheel
chroot "$ROOTFS" env -u PIP_FIND_LINKS sh -c \
    "[ -x /v/bin/python ] || python3 -m venv /v; /v/bin/pip install -q --no-index --find-links /wh \
     numpy numba cffi rich threadpoolctl safetensors pytest hypothesis setuptools wheel"

rm -rf "$ROOTFS/src" && mkdir -p "$ROOTFS/src"
tar -C "$ROOT" --exclude=.git --exclude='*.so' --exclude=build --exclude=__pycache__ \
    -cf - refimpl csrc tests bench setup.py pyproject.toml README.md | tar -x -C "$ROOTFS/src"
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(-q)
exec chroot "$ROOTFS" env -u PIP_FIND_LINKS -u CI sh -c \
    "cd /src && /v/bin/python csrc/build.py && \
     /v/bin/pip install -q --no-index --find-links /wh --no-build-isolation -e '.[test]' && \
     /v/bin/python -m pytest -p no:cacheprovider $(printf '%q ' "${args[@]}")"
