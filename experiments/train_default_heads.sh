#!/usr/bin/env bash
# Reproduce the packaged hidden-transfer heads for the default model (jaxspec/data/heads/).
# Resumable: rerun the same command after an interruption. About 35 min on a 2-core CPU.
#   experiments/train_default_heads.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs}
jaxspec distill --prompts experiments/data/distill_prompts.jsonl --out "$RUNS/distill" --max-new-tokens 192
jaxspec train hidden-transfer --data "$RUNS/distill" --layer 26 --heads 4 --steps 3000 --batch-size 64 \
    --out "$RUNS/heads-smollm2"
mkdir -p jaxspec/data/heads/smollm2-135m-instruct
cp "$RUNS/heads-smollm2/params.safetensors" "$RUNS/heads-smollm2/meta.json" jaxspec/data/heads/smollm2-135m-instruct/
