#!/usr/bin/env bash
# Reproduce checkpoints/m2-demo end to end with the repo's own commands, on a CPU.
# About an hour on a 2-core machine (checkpoints/m2-demo/MODEL_CARD.md has the times).
#   WORK=data/demo bash scripts/make_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-data/demo}
CKPT=${CKPT:-checkpoints/m2-demo}
mkdir -p "$WORK"
TIMES="$WORK/times.json"
echo "{\"machine\": \"$(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), no GPU\"}" > "$TIMES"

stage() {  # stage NAME THREADS COMMAND...: run it, record its wall time in times.json
  local name=$1 threads=$2 t0
  shift 2
  t0=$(date +%s)
  OMP_NUM_THREADS=$threads "$@"
  python - "$TIMES" "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
path, name, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = json.load(open(path)); times[name] = secs; json.dump(times, open(path, "w"), indent=1)
PY
}

stage "m2 synth (400 clips)" 1 m2 synth --out "$WORK/synth" --clips 400 --seed 0 --workers 2 --overwrite
stage "m2 train-tokenizer (1500 steps)" 1 m2 train-tokenizer --data "$WORK/synth" --out "$WORK/tokenizer" \
  --config configs/tokenizer.yaml steps=1500
stage "m2 prepare" 1 m2 prepare --data "$WORK/synth" --tokenizer "$WORK/tokenizer" --out "$WORK/prepared" --workers 2
stage "accelerate launch training/train.py (8M tokens)" 2 accelerate launch --cpu --num_processes 1 \
  --num_machines 1 --mixed_precision no --dynamo_backend no training/train.py --config configs/m2-tiny.yaml \
  data_dir="$WORK/prepared" output_dir="$WORK/run"
# Half-precision storage keeps the bundle under 40 MB; loading restores fp32.
python scripts/pack_checkpoint.py "$WORK/run/final" "$CKPT" --dtype float16
stage "m2 eval (test split)" 2 m2 eval --checkpoint "$CKPT" --data "$WORK/prepared" --out "$WORK/eval" \
  --split test --samples 256
OMP_NUM_THREADS=2 python scripts/reproduce_check.py --checkpoint "$CKPT" --work "$WORK/repro"
python scripts/plot_curves.py "$WORK/run" --out "$WORK/curves.png"
python scripts/model_card.py --checkpoint "$CKPT" --work "$WORK"
OMP_NUM_THREADS=2 python scripts/readme_gif.py --checkpoint "$CKPT" --out docs/rollout.gif
