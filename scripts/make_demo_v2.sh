#!/usr/bin/env bash
# The format-2 demo (per-modality adapters, docs/model.md) end to end, one training run:
#   synth -> train-tokenizer -> prepare -> train -> pack -> eval, each stage's time in
#   $WORK/times.json. It writes $OUT (default $WORK/m2-demo-v2), not the bundled demo: that
#   is swapped only once a format-2 checkpoint beats it on every from-frame row (issue 18).
#
#   WORK=data/demo-v2 bash scripts/make_demo_v2.sh                   # 2-core CPU: 2 h 15 min-2 h 45 min (docs/model.md, "Reproducing")
#   WORK=data/demo-v2 GPU_MINUTES=5 bash scripts/make_demo_v2.sh     # the run on one GPU (not yet tried)
#
# Knobs: CLIPS (2000); SWITCH_SHARE (0.5: clips that change action, docs/model.md run 18); SYNTH (the clips' folder, default $WORK/synth, reused with --resume);
# TOKENIZER (a trained tokenizer folder: skips train-tokenizer); TRAIN_MINUTES (50, the CPU
# run's budget); SAMPLES (256, test samples scored); WORKERS (synth and prepare processes);
# SHORT_BATCH (a short_batch override, docs/model.md run 4); STRIDE (6: the six future skeletons
# are t+1..t+S, docs/model.md run 20); OVERRIDES (more training key=value, space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-data/demo-v2}
OUT=${OUT:-$WORK/m2-demo-v2}
CLIPS=${CLIPS:-2000}
SWITCH_SHARE=${SWITCH_SHARE:-0.5}
TRAIN_MINUTES=${TRAIN_MINUTES:-50}
SAMPLES=${SAMPLES:-256}
STRIDE=${STRIDE:-6}
WORKERS=${WORKERS:-$(nproc)}
SYNTH=${SYNTH:-$WORK/synth}
mkdir -p "$WORK"
TIMES="$WORK/times.json"
GPU=$([ -n "${GPU_MINUTES:-}" ] && nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "no GPU")
echo "{\"machine\": \"$(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $GPU\"}" > "$TIMES"

stage() {  # stage NAME COMMAND...: run it, record its wall time in times.json
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  python - "$TIMES" "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
path, name, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = json.load(open(path)); times[name] = secs; json.dump(times, open(path, "w"), indent=1)
PY
}

stage "m2 synth ($CLIPS clips)" m2 synth --out "$SYNTH" --clips "$CLIPS" --seed 0 --workers "$WORKERS" --resume \
  --switch-share "$SWITCH_SHARE"
TOK=${TOKENIZER:-$WORK/tokenizer}
if [ -z "${TOKENIZER:-}" ]; then  # configs/tokenizer.yaml: 64,000 codes, 45-55 min on 2 cores
  stage "m2 train-tokenizer" m2 train-tokenizer --data "$SYNTH" --out "$TOK" --config configs/tokenizer.yaml
fi
stage "m2 prepare (hop 3)" m2 prepare --data "$SYNTH" --tokenizer "$TOK" --out "$WORK/prepared" \
  --workers "$WORKERS" --hop 3 --stride "$STRIDE"
TRAIN=(training/train.py --config configs/m2-tiny-v2.yaml data_dir="$WORK/prepared" output_dir="$WORK/run")
[ -n "${SHORT_BATCH:-}" ] && TRAIN+=("short_batch=$SHORT_BATCH")
read -r -a more <<< "${OVERRIDES:-}"
TRAIN+=("${more[@]}")
if [ -n "${GPU_MINUTES:-}" ]; then  # bf16, batch 512, sized to the minutes given
  stage "train (GPU, ${GPU_MINUTES} min)" accelerate launch --num_processes 1 --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no "${TRAIN[@]}" cpu=false dtype=bf16 tf32=true \
    num_workers=$(( WORKERS > 2 ? WORKERS - 2 : 1 )) batch_size=512 total_tokens=20000 \
    warmup_tokens=30 time_budget="$GPU_MINUTES" eval_interval=40 eval_samples=1024 checkpoint_interval=100
else
  stage "train (CPU, ${TRAIN_MINUTES} min)" accelerate launch --cpu --num_processes 1 \
    --num_machines 1 --mixed_precision no --dynamo_backend no "${TRAIN[@]}" time_budget="$TRAIN_MINUTES" \
    total_tokens=20000
fi
# Half-precision storage keeps the bundle small; loading restores fp32.
python scripts/pack_checkpoint.py "$WORK/run/final" "$OUT" --dtype float16
stage "m2 eval (test split, $SAMPLES samples)" m2 eval --checkpoint "$OUT" --data "$WORK/prepared" \
  --out "$WORK/eval" --split test --samples "$SAMPLES"
python scripts/plot_curves.py "$WORK/run" --out "$WORK/curves.png"
echo "done: $OUT, report $WORK/eval/report.md, stage times $TIMES"
