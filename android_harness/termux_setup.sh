#!/usr/bin/env bash
# Install fwdfleet's device side in Termux (Android), from a kit or from a source checkout.
#
#   bash scripts/termux_setup.sh KIT      # inside a kit written by `fwdfleet pack` (KIT defaults to ..)
#   bash android_harness/termux_setup.sh  # from a source checkout: installs the checkout
#
# numpy, onnxruntime and grpcio come from Termux's own packages: pip cannot build them on Termux
# (no manylinux wheels apply to Android, and building them needs toolchains Termux lacks).
# protobuf is a pure-Python wheel that pip installs anywhere. fwdfleet itself is installed with
# --no-deps so that pip never tries to replace those packages.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KIT="${1:-$HERE/..}"
die() { echo "termux_setup: error: $*" >&2; exit 2; }

case "${PREFIX:-}" in
    *com.termux*) ;;
    *) die "this is not Termux (\$PREFIX=${PREFIX:-unset}); on other aarch64 Linux use pi_setup.sh" ;;
esac
case "$(uname -m)" in
    aarch64 | x86_64) ;;
    *) die "$(uname -m) is a 32-bit CPU mode: onnxruntime ships no build for 32-bit ARM; use a 64-bit phone" ;;
esac

pkg update -y
pkg install -y python python-numpy python-onnxruntime python-grpcio
python -m pip install --disable-pip-version-check "protobuf>=6.31"

if [ -f "$KIT/kit.json" ]; then
    WHEEL="$(ls "$KIT"/wheels/fwdfleet-*.whl 2>/dev/null | head -n 1)"
    [ -n "$WHEEL" ] || die "the kit $KIT holds no wheels/fwdfleet-*.whl; pack it again with fwdfleet pack"
    python -m pip install --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"
elif [ -f "$HERE/../pyproject.toml" ]; then
    python -m pip install --disable-pip-version-check --no-deps "$HERE/.."
else
    die "pass a kit folder (written by fwdfleet pack) or run this from a fwdfleet checkout"
fi

python - <<'PY'
import platform, numpy, onnxruntime, grpc, google.protobuf
import fwdfleet.device_runtime.kit
print(f"ok: {platform.machine()} python {platform.python_version()} numpy {numpy.__version__} "
      f"onnxruntime {onnxruntime.__version__} grpcio {grpc.__version__} protobuf {google.protobuf.__version__}")
PY
if [ -f "$KIT/kit.json" ]; then
    python -m fwdfleet.device_runtime.kit "$KIT" --verify-only
    echo "run the device: python -m fwdfleet.device_runtime.kit $KIT --rounds 10"
fi
