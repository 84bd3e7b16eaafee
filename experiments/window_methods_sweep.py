"""MAT and speed of Jacobi, lookahead (W/N/G sweep) and SJD against AR on dev prompts.

Prompts: the first --num-prompts dev prompts (categories round-robin) whose chat encoding
falls in one 32-token bucket, so each method config compiles once. Batch 1, greedy unless
--temperature > 0; tokens/s exclude compilation (reported separately).

  python experiments/window_methods_sweep.py --prompts ../shared/data/spec_bench_dev.jsonl \
      --num-prompts 6 --max-new-tokens 64 --out experiments/results/window_methods_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp

import jaxspec
from jaxspec.api import encode_prompts

CONFIGS = [
    ("ar", {}),
    ("jacobi", dict(n=4)),
    ("jacobi", dict(n=8)),
    ("lookahead", dict(W=5, N=3, G=5)),
    ("lookahead", dict(W=5, N=4, G=5)),
    ("lookahead", dict(W=8, N=4, G=8)),
    ("lookahead", dict(W=10, N=5, G=10)),
    ("lookahead", dict(W=15, N=5, G=15)),
    ("lookahead", dict(W=5, N=4, G=5, output_ngrams=True)),
    ("sjd", dict(L=8, init="prompt")),
]


def load_prompts(path: str, n: int, bundle, lo=32, hi=64) -> list[list[int]]:
  rows = [json.loads(l) for l in open(path)]
  by_cat: dict[str, list[str]] = {}
  for r in rows:
    by_cat.setdefault(r["category"], []).append(r["turns"][0])
  mixed, i = [], 0
  while any(i < len(v) for v in by_cat.values()):
    mixed += [by_cat[c][i] for c in sorted(by_cat) if i < len(by_cat[c])]
    i += 1
  ids = [p for p in encode_prompts(bundle, mixed) if lo < len(p) <= hi]
  return ids[:n]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                    "spec_bench_dev.jsonl"))
  ap.add_argument("--num-prompts", type=int, default=6)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--only", default=None, help="comma-separated method names to run")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "window_methods_sweep.json"))
  args = ap.parse_args()
  bundle = jaxspec.load_model("smollm2-135m-instruct", dtype=jnp.float32, progress=False)
  prompts = load_prompts(args.prompts, args.num_prompts, bundle)
  results, ar_tps, ref = [], None, None
  for method, opts in CONFIGS:
    if args.only and method not in args.only.split(",") and method != "ar":
      continue
    toks = fwd = 0
    wall = comp = 0.0
    outs = []
    for p in prompts:
      r = jaxspec.generate(bundle, [p], method=method, method_options=opts, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=0)
      toks += sum(r.stats.new_tokens)
      fwd += sum(r.stats.forwards)
      wall += r.stats.wall_s
      comp += r.stats.compile_s
      outs.append(r.token_ids[0])
    tps = toks / wall
    if method == "ar":
      ar_tps, ref = tps, outs
    row = dict(method=method, options=opts, mat=toks / fwd, tokens_per_s=tps,
               speedup=tps / ar_tps if ar_tps else None, compile_s=comp,
               identical_to_ar=(outs == ref) if args.temperature == 0 else None)
    results.append(row)
    print(json.dumps(row), flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(model="smollm2-135m-instruct", dtype="float32", backend=jaxspec_backend(),
                   num_prompts=len(prompts), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   batch_size=1, timestamp=time.strftime("%Y-%m-%d %H:%M:%S"), results=results), f, indent=1)


def jaxspec_backend() -> str:
  import jax
  return jax.default_backend()


if __name__ == "__main__":
  main()
