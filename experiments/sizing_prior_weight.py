"""How hard pay per draft pulls back to its prior (draft_sizing.PRIOR_WEIGHT) vs speed, per prompt.

On a steep forward-time curve `auto` loses on prompts where drafts are rarely accepted: the
learned acceptance scale forgets rejections (DECAY) and the fixed prior pull brings drafting
back. Each weight runs in its own process (the constant is read at trace time), with AR
interleaved per prompt in that process, so per-prompt ratios compare like with like.

    python experiments/sizing_prior_weight.py --prompts PATH [--weights 1,0.25,0.0625]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the held-out prompts where `auto` was slowest (0.86-0.93x) and four where it won, in
# results/bench_auto_xeon_s9.json
IDS = (102, 164, 122, 94, 132, 404, 242, 482)

WORKER = r"""
import json, sys
weight, prompts_path, ids, max_new = json.loads(sys.argv[1])
from jaxspec.methods import draft_sizing
draft_sizing.PRIOR_WEIGHT = weight
import jaxspec
from jaxspec.bench import load_prompts
bundle = jaxspec.load_model("smollm2-135m-instruct", progress=False)
rows = {r["id"]: r for r in load_prompts(prompts_path, per_category=2)}
out = {}
for m in ("ar", "auto"):
  jaxspec.generate(bundle, [rows[ids[0]]["prompt"]], method=m, max_new_tokens=8)  # compile
for i in ids:
  s = {m: jaxspec.generate(bundle, [rows[i]["prompt"]], method=m, max_new_tokens=max_new).stats for m in ("ar", "auto")}
  rate = {m: sum(x.new_tokens) / (x.wall_s - x.prefill_s) for m, x in s.items()}
  out[i] = {"ratio": rate["auto"] / rate["ar"], "mat": s["auto"].tokens_per_forward,
            "tokens_per_forward": s["auto"].mean_forward_size}
print("RESULT " + json.dumps(out))
"""


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--weights", default="1,0.25,0.0625")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "sizing_prior_weight.json"))
  a = ap.parse_args()
  from jaxspec.machine import machine_info
  report = {"machine": machine_info(), "prompts": list(IDS), "max_new_tokens": a.max_new_tokens, "weights": {}}
  for w in (float(x) for x in a.weights.split(",")):
    r = subprocess.run([sys.executable, "-c", WORKER, json.dumps([w, a.prompts, IDS, a.max_new_tokens])],
                       capture_output=True, text=True, cwd=REPO)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not line:
      raise SystemExit(f"worker failed:\n{r.stderr[-3000:]}")
    per = json.loads(line[0][7:])
    ratios = [v["ratio"] for v in per.values()]
    report["weights"][str(w)] = {"per_prompt": per, "median_ratio": statistics.median(ratios),
                                 "min_ratio": min(ratios), "load_avg": os.getloadavg()}
    print(f"prior weight {w:7.4f}: auto / AR per prompt " +
          " ".join(f"{k}:{v['ratio']:.2f}" for k, v in per.items()) +
          f"  median {statistics.median(ratios):.3f}  min {min(ratios):.2f}", flush=True)
  Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
