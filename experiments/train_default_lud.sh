#!/usr/bin/env bash
# Reproduce the packaged LUD adapters for the default model (jaxspec/data/lud/).
# Resumable: rerun the same command after an interruption. About 60 min on a 2-core CPU
# (the distill step is shared with train_default_heads.sh and skipped when done).
#   experiments/train_default_lud.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs}
jaxspec distill --prompts experiments/data/distill_prompts.jsonl --out "$RUNS/distill" --max-new-tokens 192
jaxspec train lud --data "$RUNS/distill" --mode lora --k 4 --alpha 0.8 --rank 8 --steps 300 --batch-size 4 \
    --out "$RUNS/lud-lora-k4"
mkdir -p jaxspec/data/lud/smollm2-135m-instruct
cp "$RUNS/lud-lora-k4/params.safetensors" "$RUNS/lud-lora-k4/meta.json" jaxspec/data/lud/smollm2-135m-instruct/
