#!/usr/bin/env bash
# Reproduce the packaged hidden-transfer heads for the default model (jaxspec/data/heads/).
# Resumable: rerun the same command after an interruption. About 90 min on a 2-core CPU (two
# distillations of ~17-25 min: greedy and temperature 0.7; teacher pass 6 min; 3000 steps 16 min).
#   experiments/train_default_heads.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs}
jaxspec distill --prompts experiments/data/distill_prompts.jsonl --out "$RUNS/distill" --max-new-tokens 192
jaxspec distill --prompts experiments/data/distill_prompts.jsonl --out "$RUNS/distill_t07" --max-new-tokens 192 \
    --temperature 0.7
jaxspec train hidden-transfer --data "$RUNS/distill" "$RUNS/distill_t07" --layer 26 --heads 4 --token-input --steps 3000 --batch-size 64 \
    --out "$RUNS/heads-smollm2"
mkdir -p jaxspec/data/heads/smollm2-135m-instruct
cp "$RUNS/heads-smollm2/params.safetensors" "$RUNS/heads-smollm2/meta.json" jaxspec/data/heads/smollm2-135m-instruct/
