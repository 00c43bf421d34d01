#!/usr/bin/env bash
# Build (once) an aarch64 Debian userland with fwdfleet's device dependencies, for running the
# device runtime under qemu user-mode emulation on an x86 machine. Prints the userland's path.
#
#   bash android_harness/arm64/build_userland.sh        # build if needed, print the path
#   FWDFLEET_ARM64_REBUILD=1 bash .../build_userland.sh  # throw the cached one away first
#
# How: debootstrap's first stage (--foreign --arch=arm64, so no chroot and no emulated
# package scripts) fetches Debian's arm64 packages from this machine's configured Debian mirror;
# every downloaded .deb is then unpacked with dpkg-deb -x. The host's pip downloads the aarch64
# wheels of the base install (pyproject's [project] dependencies: numpy, onnxruntime, grpcio,
# protobuf) for the userland's Python version and installs them with --target. An ARM
# /proc/cpuinfo is placed inside the userland: qemu-aarch64 -L <userland> (see run.sh) serves it
# to the emulated process, which otherwise reads the host's x86 one (onnxruntime's cpuinfo
# crashes on it under qemu 7.2).
#
# Where: $FWDFLEET_ARM64_ROOT, else ${XDG_CACHE_HOME:-~/.cache}/fwdfleet/arm64 (outside the repo).
# A stamp file records what was built from what; a run whose inputs did not change does nothing.
# Needs: root (debootstrap), the Debian packages qemu-user-static and debootstrap, a host python3
# with pip (or $PYTHON). About 300-450 MB and under a minute on a warm mirror.
#
# Environment: FWDFLEET_ARM64_ROOT, FWDFLEET_DEBIAN_MIRROR (default: from /etc/apt/sources.list*),
# FWDFLEET_DEBIAN_SUITE (default bookworm: Python 3.11), PYTHON (host python with pip).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ROOT="${FWDFLEET_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/fwdfleet/arm64}"
SUITE="${FWDFLEET_DEBIAN_SUITE:-bookworm}"
PY="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
STAMP_NAME=".fwdfleet-userland"
PLATFORMS=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64)

log() { echo "build_userland: $*" >&2; }
die() { echo "build_userland: error: $*" >&2; exit 2; }

for tool in debootstrap dpkg-deb qemu-aarch64-static flock; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; install it: apt-get update && apt-get install -y qemu-user-static debootstrap"
done
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work; set PYTHON to a host python that has pip"
[ "$(id -u)" = 0 ] || die "debootstrap needs root (run as root, or in a CI container where you are root)"

# The base install's requirements, read from pyproject.toml so they never drift from it.
REQUIREMENTS="$("$PY" - "$REPO/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)" || die "cannot read [project] dependencies from $REPO/pyproject.toml"

# What the userland is built from: a change to any of it triggers a rebuild.
KEY="$( { cat "$HERE/build_userland.sh" "$HERE/cpuinfo"; echo "$SUITE"; echo "$REQUIREMENTS"; } | sha256sum | cut -c1-16)"

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9  # one build at a time (tests and CI steps may race)

if [ "${FWDFLEET_ARM64_REBUILD:-0}" = 1 ]; then
    rm -rf "$ROOT"
fi
if [ -f "$ROOT/$STAMP_NAME" ] && grep -qx "key=$KEY" "$ROOT/$STAMP_NAME"; then
    log "up to date: $ROOT"
    echo "$ROOT"
    exit 0
fi

mirror_from_sources() {
    # First http(s) URI of a Debian archive (not -security, not a third-party repo) in the apt sources.
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -hoE '(URIs:[[:space:]]*|^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+' "$f" \
            | grep -oE 'https?://[^[:space:]]+' | grep -E '/debian/?$' | grep -v -- '-security' || true
    done | head -n 1
}
MIRROR="${FWDFLEET_DEBIAN_MIRROR:-$(mirror_from_sources)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

START=$SECONDS
WORK="$ROOT.build.$$"
rm -rf "$WORK" "$ROOT".build.*
trap 'rm -rf "$WORK"' EXIT

log "debootstrap --foreign --arch=arm64 $SUITE from $MIRROR into $WORK"
if ! debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 \
        "$SUITE" "$WORK" "$MIRROR" >"$WORK.debootstrap.log" 2>&1; then
    tail -n 20 "$WORK.debootstrap.log" >&2
    rm -f "$WORK.debootstrap.log"
    die "debootstrap failed (log above); check the mirror ($MIRROR) or set FWDFLEET_DEBIAN_MIRROR"
fi
rm -f "$WORK.debootstrap.log"

log "unpacking $(find "$WORK/var/cache/apt/archives" -name '*.deb' | wc -l) packages"
for deb in "$WORK"/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$WORK"
done
rm -f "$WORK"/var/cache/apt/archives/*.deb

PYVER="$(readlink "$WORK/usr/bin/python3" | sed -n 's/^python\([0-9]*\.[0-9]*\)$/\1/p')"
[ -n "$PYVER" ] || die "the userland has no usr/bin/python3 -> python3.X link; is $SUITE a Debian suite with python3?"
SITE="$WORK/usr/lib/python3/dist-packages"

WHEELS="$(dirname "$ROOT")/wheels-aarch64-cp${PYVER/./}"
log "pip download aarch64 wheels for Python $PYVER into $WHEELS"
mapfile -t REQS <<<"$REQUIREMENTS"
"$PY" -m pip download --quiet --dest "$WHEELS" "${PLATFORMS[@]}" \
    --only-binary=:all: --implementation cp --python-version "$PYVER" "${REQS[@]}" \
    || die "pip could not download aarch64 wheels of: ${REQS[*]} (is PyPI reachable?)"
# Install exactly what the resolver picks now (the wheel folder may hold older versions too).
"$PY" -m pip install --quiet --no-warn-conflicts --target "$SITE" \
    --find-links "$WHEELS" --no-index "${PLATFORMS[@]}" --only-binary=:all: --implementation cp \
    --python-version "$PYVER" "${REQS[@]}" \
    || die "installing the aarch64 wheels into $SITE failed"

mkdir -p "$WORK/proc"
cp "$HERE/cpuinfo" "$WORK/proc/cpuinfo"

# Smoke test under emulation: the device stack imports and onnxruntime sees the ARM CPU.
VERSIONS="$(QEMU_CPU=cortex-a76 qemu-aarch64-static -L "$WORK" "$WORK/usr/bin/python$PYVER" -c '
import platform, numpy, onnxruntime, grpc, google.protobuf
print(f"machine={platform.machine()} numpy={numpy.__version__} onnxruntime={onnxruntime.__version__} "
      f"grpcio={grpc.__version__} protobuf={google.protobuf.__version__}")
')" || die "the emulated python cannot import numpy/onnxruntime/grpc; see the error above"

{
    echo "key=$KEY"
    echo "suite=$SUITE"
    echo "mirror=$MIRROR"
    echo "python=$PYVER"
    echo "$VERSIONS"
    echo "built_seconds=$((SECONDS - START))"
    echo "size_mb=$(du -sm "$WORK" | cut -f1)"
} >"$WORK/$STAMP_NAME"
rm -rf "$ROOT"
mv "$WORK" "$ROOT"
trap - EXIT
log "built in $((SECONDS - START)) s ($(du -sm "$ROOT" | cut -f1) MB): $VERSIONS"
echo "$ROOT"
