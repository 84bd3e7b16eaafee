"""Cost of a decode step that verifies a 1-token draft, relative to an AR step (issue target <= 1.1x).

In one process, per prompt, interleaved: AR and `pld:k=1` (every step feeds the pending token plus
one drafted token: T=2, whatever the lookup finds) over the same prompt; the decode time per step
(prefill excluded, compile excluded) is compared. `--methods` adds other specs.

    python experiments/verify_overhead.py [--num-prompts 6] [--max-new-tokens 96] [--rounds 3]
    python experiments/verify_overhead.py --categories rag,summarization --per-category 3 \
        --out experiments/results/verify_overhead_long.json          # long prompts
    python experiments/verify_overhead.py --curve 1,2,4,6,8,11,16 \
        --methods "pld:k=1,adaptive=False;pld:k=3,adaptive=False;..." # in-loop step cost vs the profiled curve

Writes experiments/results/verify_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import jaxspec
from jaxspec.bench import load_prompts
from jaxspec.methods import parse_method_spec

REPO = Path(__file__).resolve().parents[1]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--prompts", default=str(REPO.parent / "shared" / "data" / "spec_bench_dev.jsonl"))
  ap.add_argument("--categories", default="writing,qa,math,coding,translation,stem")
  ap.add_argument("--num-prompts", type=int, default=6)
  ap.add_argument("--per-category", type=int, default=1)
  ap.add_argument("--max-new-tokens", type=int, default=96)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--methods", default="pld:k=1")
  ap.add_argument("--curve", default="", help="also record jaxspec.profiling's forward-time curve at these sizes")
  ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "verify_overhead.json"))
  a = ap.parse_args()
  bundle = jaxspec.load_model(a.model, progress=False)
  prompts = load_prompts(a.prompts, a.categories.split(","), per_category=a.per_category)[: a.num_prompts]
  specs = [("ar", {}, "ar")] + [parse_method_spec(m) for m in a.methods.split(";")]
  per_step = {label: [] for _, _, label in specs}
  for name, opts, _ in specs:  # compile everything first
    jaxspec.generate(bundle, [prompts[0]["prompt"]], method=name, method_options=opts, max_new_tokens=8)
  for _ in range(a.rounds):
    for p in prompts:
      for name, opts, label in specs:
        s = jaxspec.generate(bundle, [p["prompt"]], method=name, method_options=opts,
                             max_new_tokens=a.max_new_tokens).stats
        per_step[label].append((s.wall_s - s.prefill_s) / max(s.steps, 1))
  ar = per_step["ar"]
  from jaxspec.machine import machine_info
  from jaxspec.profiling import forward_time_curve
  curve = forward_time_curve(bundle, [int(t) for t in a.curve.split(",")]) if a.curve else {}
  report = {"model": a.model, "machine": machine_info(),
            "forward_time_curve_ratio": {str(t): v / curve[min(curve)] for t, v in curve.items()}, "categories": a.categories, "prompts": len(prompts), "rounds": a.rounds, "load_avg": os.getloadavg(),
            "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in per_step.items()},
            "ratio_to_ar": {k: statistics.median([x / y for x, y in zip(v, ar)]) for k, v in per_step.items()}}
  for k in per_step:
    print(f"{k:24s} step {report['median_step_ms'][k]:6.1f} ms   x AR {report['ratio_to_ar'][k]:.3f}")
  Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {a.out} (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()
