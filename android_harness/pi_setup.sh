#!/usr/bin/env bash
# Install fwdfleet's device side on Raspberry Pi OS 64-bit or any 64-bit Linux (aarch64, x86_64):
# a venv with the base install (numpy, onnxruntime, grpcio, protobuf wheels from PyPI).
#
#   bash scripts/pi_setup.sh KIT          # inside a kit written by `fwdfleet pack` (KIT defaults to ..)
#   bash android_harness/pi_setup.sh      # from a source checkout: installs the checkout
#
# The venv goes to $FWDFLEET_VENV (default ~/fwdfleet-venv). 32-bit ARM (armv7l/armv6l, the
# 32-bit Raspberry Pi OS) is not supported: onnxruntime publishes no wheel for it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KIT="${1:-$HERE/..}"
VENV="${FWDFLEET_VENV:-$HOME/fwdfleet-venv}"
PY="${PYTHON:-python3}"
die() { echo "pi_setup: error: $*" >&2; exit 2; }

command -v "$PY" >/dev/null || die "$PY not found; install it (sudo apt install python3 python3-venv)"
BITS="$("$PY" -c 'import struct; print(struct.calcsize("P") * 8)')"
MACHINE="$(uname -m)"
case "$MACHINE/$BITS" in
    aarch64/64 | x86_64/64) ;;
    armv6l/* | armv7l/* | armv8l/* | aarch64/32)
        die "32-bit ARM ($MACHINE, ${BITS}-bit Python): onnxruntime publishes no wheel for it; install a 64-bit OS (Raspberry Pi OS 64-bit)" ;;
    *) die "unsupported platform $MACHINE/${BITS}-bit: the device side needs 64-bit aarch64 or x86_64 Linux" ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" || die "cannot create a venv; install the venv module (sudo apt install python3-venv)"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
if [ -f "$KIT/kit.json" ]; then
    WHEEL="$(ls "$KIT"/wheels/fwdfleet-*.whl 2>/dev/null | head -n 1)"
    [ -n "$WHEEL" ] || die "the kit $KIT holds no wheels/fwdfleet-*.whl; pack it again with fwdfleet pack"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$WHEEL"  # the base dependencies
elif [ -f "$HERE/../pyproject.toml" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$HERE/.."
else
    die "pass a kit folder (written by fwdfleet pack) or run this from a fwdfleet checkout"
fi

"$VENV/bin/python" - <<'PY'
import platform, numpy, onnxruntime, grpc, google.protobuf
import fwdfleet.device_runtime.kit
print(f"ok: {platform.machine()} python {platform.python_version()} numpy {numpy.__version__} "
      f"onnxruntime {onnxruntime.__version__} grpcio {grpc.__version__} protobuf {google.protobuf.__version__}")
PY
if [ -f "$KIT/kit.json" ]; then
    "$VENV/bin/python" -m fwdfleet.device_runtime.kit "$KIT" --verify-only
    echo "run the device: $VENV/bin/python -m fwdfleet.device_runtime.kit $KIT --rounds 10"
fi
