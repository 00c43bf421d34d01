#!/usr/bin/env bash
# Push a device kit to an Android phone, run fwdfleet's device runtime in Termux, and collect
# its log and memory figures.
#
#   bash android_harness/adb_run.sh KIT [--rounds N] [--out DIR] [--serial SERIAL]
#        [--via auto|run-as|intent] [--setup] [--data REMOTE_PATH] [--timeout SECONDS]
#
# Needs: adb on this machine; on the phone Termux (F-Droid/GitHub build). The runtime is started
# inside Termux's sandbox either with
#   * run-as com.termux  (works when the installed Termux is a debuggable build), or
#   * Termux's RUN_COMMAND intent (in Termux: `termux-setup-storage`, and
#     `allow-external-apps = true` in ~/.termux/termux.properties; see the README).
# --via auto (default) uses run-as when it works, else the intent. --setup runs the kit's
# scripts/termux_setup.sh first (needs network on the phone).
#
# What comes back into --out (default runs/android-<kit>-<time>):
#   run.log                  the runtime's log (python -m fwdfleet.device_runtime.kit KIT --rounds N)
#   memory_inference.json    peak RSS (VmHWM) of a fresh process doing 2 forwards
#   memory_train.json        ... and of one training step (K central differences + update);
#                            the same workers and JSON as `fwdfleet device memory`
#   runtime_status.txt       VmRSS/VmHWM of the runtime process, sampled every second in Termux
#   dumpsys_meminfo.txt      `dumpsys meminfo` lines of the runtime's pid, sampled from adb
#   summary.json             the figures above in one object
set -euo pipefail
die() { echo "adb_run: error: $*" >&2; exit 2; }

KIT="" ROUNDS=5 OUT="" SERIAL="" VIA=auto SETUP=0 DATA="" TIMEOUT=1800
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --serial) SERIAL="$2"; shift 2 ;;
        --via) VIA="$2"; shift 2 ;;
        --setup) SETUP=1; shift ;;
        --data) DATA="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$KIT" ] || die "one kit at a time"; KIT="$1"; shift ;;
    esac
done
[ -n "$KIT" ] || die "usage: adb_run.sh KIT [options]; make a kit with \`fwdfleet pack\`"
[ -f "$KIT/kit.json" ] || die "$KIT has no kit.json; make a kit with \`fwdfleet pack\`"
command -v adb >/dev/null || die "adb not found; install Android platform-tools (apt-get install adb)"
case "$VIA" in auto | run-as | intent) ;; *) die "--via must be auto, run-as or intent" ;; esac

ADB=(adb)
[ -n "$SERIAL" ] && ADB+=(-s "$SERIAL")
ash() { "${ADB[@]}" shell "$@" | tr -d '\r'; }

[ "$("${ADB[@]}" get-state 2>/dev/null)" = device ] || die "no device online (adb devices); connect one or pass --serial"
ABI="$(ash getprop ro.product.cpu.abi)"
case "$ABI" in
    arm64-v8a | x86_64) ;;
    *) die "the phone's ABI is $ABI: onnxruntime has no 32-bit ARM build; a 64-bit (arm64-v8a) phone is needed" ;;
esac
ash pm path com.termux | grep -q package: || die "Termux (com.termux) is not installed on the phone"

NAME="$(basename "$(cd "$KIT" && pwd)")"
TPREFIX=/data/data/com.termux/files/usr
THOME=/data/data/com.termux/files/home
OUT="${OUT:-runs/android-$NAME-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

# How the runtime starts decides where files go:
#  run-as: the kit is pushed to /data/local/tmp (run-as can read it), results stay in Termux's
#          home and come back with `run-as com.termux cat`;
#  intent: the kit and the results go through shared storage (/sdcard), which Termux reads once
#          it has storage access; the token is deleted from shared storage as soon as it is copied.
if [ "$VIA" != intent ] && ash run-as com.termux true >/dev/null 2>&1; then
    VIA=run-as
    SHARED="/data/local/tmp/fwdfleet/$NAME"
    RESULTS="$THOME/fwdfleet/$NAME.results"
elif [ "$VIA" = run-as ]; then
    die "run-as com.termux failed: this Termux build is not debuggable; use --via intent"
else
    VIA=intent
    SHARED="/sdcard/fwdfleet/$NAME"
    RESULTS="$SHARED"
fi
dev_cat() {
    if [ "$VIA" = run-as ]; then "${ADB[@]}" exec-out run-as com.termux cat "$1" 2>/dev/null; else "${ADB[@]}" exec-out cat "$1" 2>/dev/null; fi
}

# The script Termux runs: copy the kit into Termux's private home, optionally install, measure
# memory with fresh worker processes, run the rounds, and sample the runtime's memory each second.
RUNNER="$(mktemp)"
trap 'rm -f "$RUNNER"' EXIT
cat >"$RUNNER" <<EOF
set -u
export PREFIX=$TPREFIX HOME=$THOME PATH=$TPREFIX/bin:\$PATH TMPDIR=$TPREFIX/tmp
SRC=$SHARED; DST=\$HOME/fwdfleet/$NAME; RES=$RESULTS
mkdir -p \$RES; rm -f \$RES/exit_code \$RES/runtime.pid
rm -rf \$DST && mkdir -p \$HOME/fwdfleet && cp -r \$SRC/kit \$DST
[ $VIA = intent ] && rm -rf \$SRC/kit/credentials
chmod 700 \$DST; [ -f \$DST/credentials/token ] && chmod 600 \$DST/credentials/token
if [ $SETUP = 1 ]; then bash \$DST/scripts/termux_setup.sh \$DST > \$RES/setup.log 2>&1 || { echo 3 > \$RES/exit_code; exit 3; }; fi
python -m fwdfleet.device_runtime.memory \$DST/bundle.zip --mode inference > \$RES/memory_inference.json 2>> \$RES/run.log
python -m fwdfleet.device_runtime.memory \$DST/bundle.zip --mode train > \$RES/memory_train.json 2>> \$RES/run.log
python -m fwdfleet.device_runtime.kit \$DST --rounds $ROUNDS ${DATA:+--data $DATA} >> \$RES/run.log 2>&1 &
PID=\$!; echo \$PID > \$RES/runtime.pid
while kill -0 \$PID 2>/dev/null; do
    grep -E '^(VmRSS|VmHWM)' /proc/\$PID/status > \$RES/runtime_status.tmp 2>/dev/null && mv \$RES/runtime_status.tmp \$RES/runtime_status.txt
    sleep 1
done
wait \$PID; echo \$? > \$RES/exit_code
EOF

echo "adb_run: pushing $KIT to $SHARED (start via $VIA)"
ash rm -rf "$SHARED"
ash mkdir -p "$SHARED"
"${ADB[@]}" push "$KIT" "$SHARED/kit" >/dev/null
"${ADB[@]}" push "$RUNNER" "$SHARED/run_on_device.sh" >/dev/null
if [ "$VIA" = run-as ]; then
    ash chmod -R a+rX "$SHARED"
    echo "adb_run: starting the runtime with run-as com.termux"
    "${ADB[@]}" shell run-as com.termux $TPREFIX/bin/bash "$SHARED/run_on_device.sh" </dev/null >/dev/null 2>&1 &
else
    echo "adb_run: starting the runtime with Termux's RUN_COMMAND intent"
    REPLY="$(ash am startservice --user 0 -n com.termux/com.termux.app.RunCommandService \
        -a com.termux.RUN_COMMAND \
        --es com.termux.RUN_COMMAND_PATH "$TPREFIX/bin/bash" \
        --esa com.termux.RUN_COMMAND_ARGUMENTS "$SHARED/run_on_device.sh" \
        --ez com.termux.RUN_COMMAND_BACKGROUND true 2>&1)"
    if echo "$REPLY" | grep -qiE "error|exception"; then
        die "the RUN_COMMAND intent was refused ($REPLY); set allow-external-apps = true in Termux (see README)"
    fi
fi

echo "adb_run: waiting for the runtime (timeout ${TIMEOUT}s)"
: >"$OUT/dumpsys_meminfo.txt"
START=$SECONDS
while [ -z "$(dev_cat "$RESULTS/exit_code")" ]; do
    [ $((SECONDS - START)) -lt "$TIMEOUT" ] || { echo "adb_run: timed out; collecting what there is" >&2; break; }
    PID="$(dev_cat "$RESULTS/runtime.pid" | tr -dc 0-9)"
    if [ -n "$PID" ]; then
        { echo "# t=$((SECONDS - START))s"; ash dumpsys meminfo | grep -E "\(pid ${PID}[ )]" || true; } >>"$OUT/dumpsys_meminfo.txt"
    fi
    sleep 2
done
{ echo "# com.termux at the end"; ash dumpsys meminfo com.termux || true; } >>"$OUT/dumpsys_meminfo.txt"

for f in run.log setup.log memory_inference.json memory_train.json runtime_status.txt exit_code; do
    dev_cat "$RESULTS/$f" >"$OUT/$f" || true
    [ -s "$OUT/$f" ] || rm -f "$OUT/$f"
done
ash rm -rf "$SHARED"

python3 - "$OUT" "$ABI" "$(ash getprop ro.product.model)" <<'PY'
import json, re, sys
from pathlib import Path
out, abi, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def load(name):
    p = out / name
    try:
        return json.loads([ln for ln in p.read_text().splitlines() if ln.startswith("{")][-1])
    except (OSError, IndexError, ValueError):
        return None
status = (out / "runtime_status.txt").read_text() if (out / "runtime_status.txt").exists() else ""
hwm = re.search(r"VmHWM:\s+(\d+)", status)
pss = [int(m.replace(",", "")) for m in re.findall(r"([\d,]+)K: \S+ \(pid", (out / "dumpsys_meminfo.txt").read_text())]
code = (out / "exit_code").read_text().strip() if (out / "exit_code").exists() else None
summary = {
    "device": model, "abi": abi, "exit_code": code,
    "runtime_peak_rss_mb": int(hwm.group(1)) / 1024 if hwm else None,
    "runtime_max_pss_mb": max(pss) / 1024 if pss else None,
    "memory_inference": load("memory_inference.json"), "memory_train": load("memory_train.json"),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
echo "adb_run: results in $OUT"
