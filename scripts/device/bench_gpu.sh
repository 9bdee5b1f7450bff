#!/usr/bin/env bash
# The device check of docs/bench.md, as one script for a lent GPU (run by the `run` tool from the repository root):
# profile, prefill, decode and train benches in bf16 at the LLaVA-OV 0.5B shapes, JSON into $OUT (default runs/gpu).
# About 5 minutes on an H100-class GPU, then `visor realsize` (every stage of the real recipe, 2 steps at real shapes;
# ZeRO-2 on the full fine-tune with one process; REALSIZE=0 skips it). CONFIG, DEVICE and DTYPE override the defaults (CONFIG=experiments/debug/tiny.yaml
# DEVICE=cpu DTYPE=float32 checks the script itself in about two minutes).
set -euo pipefail
OUT="${OUT:-runs/gpu}"
CONFIG="${CONFIG:-experiments/llava_ov_0.5b/model.yaml}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$OUT"
export VISOR_PROFILE_DIR="$OUT/profiles"
v() { "$PY" -m visor_lightning bench "$@"; }
run() { local name=$1; shift; echo "== $name: visor bench $*"; v "$@" --json --out "$OUT/$name.json" > /dev/null; }
v profile --device "$DEVICE" --dtype "$DTYPE" --json > "$OUT/profile.json"
common=(--config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE")
run prefill_b1_1x1 prefill "${common[@]}" --grid 1x1 --repeats 5
run prefill_b1_2x2 prefill "${common[@]}" --grid 2x2 --repeats 5
run prefill_b4_1x1 prefill "${common[@]}" --grid 1x1 --batch 4 --repeats 5
run decode_b1 decode "${common[@]}" --grid 1x1 --repeats 5
run decode_b8 decode "${common[@]}" --grid 1x1 --batch 8 --repeats 5
run decode_b32 decode "${common[@]}" --grid 1x1 --batch 32 --repeats 5
run train_b1 train "${common[@]}" --grid 1x1 --repeats 3
if [ "${REALSIZE:-1}" = 1 ]; then
  echo "== realsize: visor realsize --out $OUT/realsize (ZeRO-2 stage: ${REALSIZE_ZERO2:-stage2_sft})"
  "$PY" -m visor_lightning realsize --out "$OUT/realsize" --zero2 "${REALSIZE_ZERO2:-stage2_sft}" \
    --zero2-devices "${REALSIZE_GPUS:-1}" --json > "$OUT/realsize.json" || echo "realsize FAILED: see $OUT/realsize/realsize.log"
  cp "$OUT/realsize/realsize.md" "$OUT/realsize.md" 2>/dev/null && cat "$OUT/realsize.md"
  rm -rf "$OUT/realsize/llava-onevision-qwen2-0.5b-ov-random"  # 1.7 GB, rebuilt in 30 s
fi
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*_b*.json")):
    r = json.loads(f.read_text())
    worst = max(r["rows"], key=lambda x: abs(x["measured_over_predicted"] - 1))
    print(f"{f.stem}: worst measured/predicted {worst['measured_over_predicted']:.2f} ({worst['config']})")
PY
