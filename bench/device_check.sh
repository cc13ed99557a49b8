#!/usr/bin/env bash
# One short check on a machine of another kind (a GPU machine with its own CPU type), in one go:
#
# 1. Portable bits on a second CPU type: trains bench/determinism.py's workload in portable strict mode on
#    this machine's CPU and compares the model fingerprint with EXPECTED_PORTABLE, the one measured on the
#    development machine (AMD EPYC with AVX-512, 2 cores). Equal means the portable pins hold on this CPU.
# 2. Native bits on this CPU, for contrast (expected to differ where the CPU types differ).
# 3. GPU determinism and speed, when TensorFlow sees a GPU: two strict GPU runs (same fingerprint expected)
#    against one CPU run of the same workload, timed side by side.
#
# Needs the project's environment: .venv from `make install` (which needs the package registry or a
# wheelhouse through PIP_FIND_LINKS), or PY=/path/to/python of an environment holding the locked packages.
# The GPU part needs TensorFlow with CUDA (`pip install -e .[gpu]`). Writes its figures to $OUT (or
# ./device-check) and exits 1 when a check fails.
#
# Usage: bench/device_check.sh   or   PY=/path/to/python bench/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

EXPECTED_PORTABLE=0f0789341a633a151cbc7284b0eef78270b9bfe801aa1bce0f750ca5c04d1b52
EPOCHS=2
IMAGES=96
OUT="${OUT:-device-check}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || make install >"$OUT/install.log" 2>&1
export PYTHONPATH="$PWD" TF_CPP_MIN_LOG_LEVEL=2 USERNAME="${USERNAME:-petseg}"

worker() {  # variant, extra environment...
    local variant=$1; shift
    env "$@" "$PY" bench/determinism.py --worker "$variant" --epochs "$EPOCHS" --images "$IMAGES" | tail -n 1
}

status=0
grep -m1 "model name" /proc/cpuinfo | tee "$OUT/cpu.txt"
portable=$(worker portable CUDA_VISIBLE_DEVICES=) ; echo "$portable" >"$OUT/portable.json"
native=$(worker native CUDA_VISIBLE_DEVICES=) ; echo "$native" >"$OUT/native.json"
got=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["fingerprint"])' "$portable")
if [ "$got" = "$EXPECTED_PORTABLE" ]; then
    echo "portable fingerprint on this CPU: $got (the expected one)"
else
    echo "portable fingerprint on this CPU: $got, expected $EXPECTED_PORTABLE: MISMATCH"; status=1
fi
echo "native fingerprint on this CPU:   $("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["fingerprint"])' "$native")"

if "$PY" -c 'import sys, tensorflow as tf; sys.exit(not tf.config.list_physical_devices("GPU"))' 2>/dev/null; then
    for round in 1 2; do worker native >"$OUT/gpu-$round.json"; done
    "$PY" - "$OUT" <<'PY' || status=1
import json, sys
out = sys.argv[1]
gpu = [json.load(open(f"{out}/gpu-{n}.json")) for n in (1, 2)]
cpu = json.load(open(f"{out}/native.json"))
same = gpu[0]["fingerprint"] == gpu[1]["fingerprint"]
print(f"GPU strict runs identical: {same}; GPU {gpu[0]['seconds']:.2f} s, CPU {cpu['seconds']:.2f} s, "
      f"CPU/GPU {cpu['seconds'] / gpu[0]['seconds']:.2f}x")
sys.exit(0 if same else 1)
PY
else
    echo "no GPU visible to TensorFlow: GPU checks skipped"
fi
exit "$status"
