"""The floor of pay per draft: what a decode step costs over AR's when the method drafts nothing.

Each method runs with forward costs that make every draft look unprofitable, so every step is a
1-token forward plus the method's bookkeeping (lookup, size switch, padded logits, matrix update).
Interleaved per prompt in one process; median decode time per step (prefill and compile excluded)
relative to AR's. A zero-acceptance prompt runs at 1 / this ratio of AR's speed.

    python experiments/floor_cost.py [--rounds 2] [--temperature 0.7] [--out experiments/results/floor_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import jaxspec
from jaxspec.bench import load_prompts
from jaxspec.machine import machine_info
from jaxspec.methods.hidden_transfer import HiddenTransfer
from jaxspec.methods.lookahead import Lookahead
from jaxspec.methods.prompt_lookup import PromptLookup
from jaxspec.methods.token_recycling import TokenRecycling

REPO = Path(__file__).resolve().parents[1]
NEVER = (1.0, 100.0, 100.0)
METHODS = {
    "ar": "ar",
    "pld k=8 (T=1 always)": PromptLookup(k=8, sizes=(1, 9), cost=(1.0, 100.0)),
    "recycling tiny (T=1 always)": TokenRecycling(template="tiny", cost=NEVER),
    "recycling 16 nodes (T=1 always)": TokenRecycling(template="medium", cost=NEVER),
    "recycling tiny + lookup 5 = auto (T=1 always)": TokenRecycling(template="tiny", lookup=5, cost=NEVER),
    "hidden_transfer (T=1 always)": HiddenTransfer(cost=NEVER),
    "lookahead 2/2/1 adaptive (T=1 but probes)": Lookahead(W=2, N=2, G=1, adaptive=True, cost=NEVER),
    "pld k=1 fixed (T=2 always)": PromptLookup(k=1, adaptive=False),
}


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--prompts", default=str(REPO.parent / "shared" / "data" / "spec_bench_dev.jsonl"))
  ap.add_argument("--num-prompts", type=int, default=4)
  ap.add_argument("--max-new-tokens", type=int, default=96)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "floor_cost.json"))
  a = ap.parse_args()
  bundle = jaxspec.load_model(a.model, progress=False)
  prompts = load_prompts(a.prompts, per_category=1)[: a.num_prompts]
  for m in METHODS.values():  # compile everything first
    jaxspec.generate(bundle, [prompts[0]["prompt"]], method=m, max_new_tokens=8, temperature=a.temperature)
  per_step = {k: [] for k in METHODS}
  for _ in range(a.rounds):
    for p in prompts:
      for label, m in METHODS.items():
        s = jaxspec.generate(bundle, [p["prompt"]], method=m, max_new_tokens=a.max_new_tokens,
                             temperature=a.temperature).stats
        per_step[label].append((s.wall_s - s.prefill_s) / max(s.steps, 1))
  ar = per_step["ar"]
  report = {"model": a.model, "machine": machine_info(), "prompts": len(prompts), "rounds": a.rounds,
            "temperature": a.temperature,
            "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in per_step.items()},
            "ratio_to_ar": {k: statistics.median([x / y for x, y in zip(v, ar)]) for k, v in per_step.items()},
            "load_avg": os.getloadavg()}
  for k in METHODS:
    print(f"{k:48s} step {report['median_step_ms'][k]:6.1f} ms   x AR {report['ratio_to_ar'][k]:.3f}")
  Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
