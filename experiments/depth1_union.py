"""Depth 1 of the hidden-transfer tree: the heads' top-a, the recycled matrix's top-b of the
pending token, or both? Teacher-forced on greedy text, no timing (runs beside other jobs).

The base model writes 128 greedy tokens per held-out prompt; at every output position the heads
draft the token after the pending one exactly as decoding does (`pseudo_logits`), and the Token
Recycling matrix is emulated as decoding fills it: every committed token is in a forward, whose
logits give the matrix row of that token (top-k), rows persisting across prompts in bench order.
The matrix candidates for a step are the pending token's row as last written before it.

Reported: the fraction of steps whose true next token is among the candidates (depth-1
acceptance of a tree holding those candidates at depth 1), for heads top-a, matrix top-b and
their union (duplicates collapse, so a union of a + b holds <= a + b distinct nodes; the mean
distinct count is reported); and per slot of the deduplicated merged list decoding uses
(`hidden_transfer:root_recycle`): heads top-1, matrix top-1, heads 2..6, matrix 2.

    python experiments/depth1_union.py --prompts spec_bench_dev.jsonl [--heads DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "depth1_union.json"


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--per-category", type=int, default=2)
  ap.add_argument("--heads", default=None, help="heads folder (default: the packaged heads)")
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--k", type=int, default=8, help="matrix candidates per token")
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  import jax.numpy as jnp

  import jaxspec
  from jaxspec import api, bench
  from jaxspec.heads_file import load_params_file
  from jaxspec.machine import machine_info
  from jaxspec.methods.hidden_transfer import KIND, default_heads
  from heads_on_greedy_text import score_greedy_text

  bundle = jaxspec.load_model(args.model, progress=False)
  heads_dir = args.heads or str(default_heads(bundle.name))
  params, meta = load_params_file(heads_dir, bundle, KIND)
  heads = {n: jnp.asarray(v) for n, v in params.items() if n != "vocab_N"}  # whole vocabulary
  prompts = bench.load_prompts(args.prompts, per_category=args.per_category)
  ids = [api.encode_prompts(bundle, [p["prompt"]])[0] for p in prompts]
  scored = score_greedy_text(bundle, heads, int(meta["layer"]), ids, args.new_tokens, args.k)
  matrix = {}  # token -> its top-k next tokens, as last written
  A_MAX, B_MAX = 6, 6
  hit = np.zeros((A_MAX + 1, B_MAX + 1))
  distinct = np.zeros((A_MAX + 1, B_MAX + 1))
  merged_hit = np.zeros(A_MAX + 2)  # per slot of the merged list h0, m0, h1..h5, m1 (deduplicated)
  steps = 0
  for p, d in zip(ids, scored):
    seq, head_top, logit_top = d["seq"].tolist(), d["hi"], d["ri"]
    anchors = np.arange(len(p) - 1, len(seq) - 2)  # anchor n: token n+1 pending, n+2 drafted
    # the prompt's last token is in the prefill forward; earlier prompt tokens are not
    matrix[seq[len(p) - 1]] = logit_top[len(p) - 1]
    for i, n in enumerate(anchors):
      pending, target = seq[n + 1], seq[n + 2]
      row = matrix.get(pending)
      for a in range(A_MAX + 1):
        for b in range(B_MAX + 1):
          cand = set(head_top[i, :a].tolist()) | (set(row[:b].tolist()) if row is not None else set())
          hit[a, b] += target in cand
          distinct[a, b] += len(cand)
      merged = [head_top[i, 0]] + ([row[0]] if row is not None else []) + list(head_top[i, 1:A_MAX])
      merged += [row[1]] if row is not None else []
      merged = list(dict.fromkeys(int(t) for t in merged))  # first occurrence kept, order kept
      if target in merged:
        merged_hit[merged.index(target)] += 1
      matrix[pending] = logit_top[n + 1]  # the pending token's forward writes its row
      steps += 1
  table = {f"heads{a}+matrix{b}": {"accept": round(float(hit[a, b] / steps), 4),
                                   "distinct": round(float(distinct[a, b] / steps), 2)}
           for a in range(A_MAX + 1) for b in range(B_MAX + 1)}
  merged = [round(float(x / steps), 4) for x in merged_hit]
  report = {"machine": machine_info(), "heads": heads_dir, "prompts": len(prompts), "steps": steps, "table": table,
            "merged_order": "heads0, matrix0, heads1..heads5, matrix1 (duplicates dropped, later ones move up)",
            "merged_slot_accept": merged}
  print("merged slot accept", merged)
  for a in range(A_MAX + 1):
    print(" ".join(f"{hit[a, b] / steps:.3f}({distinct[a, b] / steps:.1f})" for b in range(B_MAX + 1)))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
