#!/usr/bin/env bash
# Run the aarch64 userland's python3 under qemu user-mode emulation, with this repo importable.
#
#   bash android_harness/arm64/run.sh -c 'import platform; print(platform.machine())'   # aarch64
#   bash android_harness/arm64/run.sh -m some.module --flag
#   bash android_harness/arm64/run.sh path/to/script.py args...
#
# Every argument goes to python3. The userland is the one build_userland.sh made
# ($FWDFLEET_ARM64_ROOT, else ~/.cache/fwdfleet/arm64); build it first.
#
# qemu-aarch64-static -L <userland> resolves absolute paths inside the userland first when the
# file exists there: the dynamic loader, the libraries, and /proc/cpuinfo (an ARM one, copied
# from android_harness/arm64/cpuinfo at build time; onnxruntime crashes reading the host's x86
# one under qemu 7.2). No root, chroot or mount namespace is needed. Anything not in the
# userland (this repo, /tmp, sockets) is the host's, so an emulated device reaches an x86 server
# on 127.0.0.1 directly.
#
# QEMU_CPU defaults to cortex-a76 (a Raspberry Pi 5 / recent phone core). PYTHONPATH is this
# repo plus $FWDFLEET_ARM64_PYTHONPATH: the host's PYTHONPATH is dropped, as it holds x86 builds.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ROOT="${FWDFLEET_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/fwdfleet/arm64}"

if [ ! -f "$ROOT/.fwdfleet-userland" ]; then
    echo "arm64/run.sh: error: no aarch64 userland at $ROOT; build it: bash $HERE/build_userland.sh" >&2
    exit 2
fi
if ! command -v qemu-aarch64-static >/dev/null 2>&1; then
    echo "arm64/run.sh: error: qemu-aarch64-static not found; install it: apt-get install -y qemu-user-static" >&2
    exit 2
fi
PYVER="$(sed -n 's/^python=//p' "$ROOT/.fwdfleet-userland")"

export QEMU_CPU="${QEMU_CPU:-cortex-a76}"
export PYTHONPATH="$REPO${FWDFLEET_ARM64_PYTHONPATH:+:$FWDFLEET_ARM64_PYTHONPATH}"
export PYTHONNOUSERSITE=1
unset PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV LD_LIBRARY_PATH LD_PRELOAD
exec qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python$PYVER" "$@"
