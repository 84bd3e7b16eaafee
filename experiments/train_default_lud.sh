#!/usr/bin/env bash
# Reproduce the packaged LUD adapters for the default model (jaxspec/data/lud/).
# Resumable: rerun the same command after an interruption. About 100 min on a 2-core CPU: two
# distillations (greedy ~14 min, temperature 0.7 ~23 min; shared with train_default_heads.sh and
# skipped when done), a teacher pass (~5 min) and 300 steps (~9 s each).
#   experiments/train_default_lud.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs}
jaxspec distill --prompts experiments/data/distill_prompts.jsonl --out "$RUNS/distill" --max-new-tokens 192
jaxspec distill --prompts experiments/data/distill_prompts.jsonl --out "$RUNS/distill_t07" --max-new-tokens 192 \
    --temperature 0.7
jaxspec train lud --data "$RUNS/distill" "$RUNS/distill_t07" --mode lora --k 4 --alpha 0.8 --rank 8 --steps 300 --batch-size 4 \
    --out "$RUNS/lud-lora-k4"
mkdir -p jaxspec/data/lud/smollm2-135m-instruct
cp "$RUNS/lud-lora-k4/params.safetensors" "$RUNS/lud-lora-k4/meta.json" jaxspec/data/lud/smollm2-135m-instruct/
