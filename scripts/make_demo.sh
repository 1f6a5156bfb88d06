#!/usr/bin/env bash
# Reproduce checkpoints/m2-demo end to end with the repo's own commands, on a CPU.
# About an hour on a 2-core machine (see checkpoints/m2-demo/MODEL_CARD.md for the times).
#   WORK=data/demo bash scripts/make_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-data/demo}
# One thread per process: on 2 shared cores, oversubscribed threads run several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

m2 synth --out "$WORK/synth" --clips 400 --seed 0 --workers 2
m2 train-tokenizer --data "$WORK/synth" --out "$WORK/tokenizer" --config configs/tokenizer.yaml steps=1500
m2 prepare --data "$WORK/synth" --tokenizer "$WORK/tokenizer" --out "$WORK/prepared"
accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  training/train.py --config configs/m2-tiny.yaml data_dir="$WORK/prepared" output_dir="$WORK/run"
# Half-precision storage keeps the bundle under 40 MB; loading restores fp32.
python scripts/pack_checkpoint.py "$WORK/run/final" checkpoints/m2-demo --dtype float16
m2 eval --checkpoint checkpoints/m2-demo --data "$WORK/prepared" --out "$WORK/eval"
python scripts/model_card.py --checkpoint checkpoints/m2-demo --report "$WORK/eval/report.json"
