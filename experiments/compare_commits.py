"""Tokens/s of AR and methods at two commits, interleaved on the same machine.

Two versions of the package cannot share one process, so each round runs one short process per
commit (a git worktree each, the installed dependencies shared), alternating old/new, and keeps
the median per method over rounds. Compile time is excluded (each process warms every method
once first). Records the CPU, the load average and a per-round reference.

  python experiments/compare_commits.py --old 12a6326 --new HEAD --prompts tests/data/spec_bench_mini.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
import jax.numpy as jnp
import jaxspec
from jaxspec.bench import load_prompts
methods, prompts_path, n, max_new = json.loads(sys.argv[1])
bundle = jaxspec.load_model("smollm2-135m-instruct", dtype=jnp.float32, progress=False)
prompts = [p["prompt"] for p in load_prompts(prompts_path, None, 1)][:n]
out = {}
for spec in methods:
  name, _, rest = spec.partition(":")
  opts = dict(kv.split("=") for kv in rest.split(",") if kv)
  opts = {k: (int(v) if v.isdigit() else v) for k, v in opts.items()}
  jaxspec.generate(bundle, [prompts[0]], method=name, method_options=opts, max_new_tokens=max_new)  # compile
  tokens = wall = 0.0
  for p in prompts:
    s = jaxspec.generate(bundle, [p], method=name, method_options=opts, max_new_tokens=max_new).stats
    tokens, wall = tokens + sum(s.new_tokens), wall + s.wall_s
  out[spec] = tokens / wall
print("RESULT " + json.dumps(out))
"""


def run_at(tree: Path, args) -> dict:
  env = dict(os.environ, PYTHONPATH=str(tree))
  cmd = [sys.executable, "-c", WORKER, json.dumps([args.methods.split(), args.prompts, args.num_prompts,
                                                   args.max_new_tokens])]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  if r.returncode or not line:
    raise SystemExit(f"worker at {tree} failed:\n{r.stderr[-3000:]}")
  return json.loads(line[0][7:])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--old", required=True)
  ap.add_argument("--new", default="HEAD")
  ap.add_argument("--methods", default="ar pld:k=5 recycling:template=small")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--num-prompts", type=int, default=6)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  args.prompts = str(Path(args.prompts).resolve())
  results = {"old": [], "new": []}
  with tempfile.TemporaryDirectory() as tmp:
    trees = {}
    for side in ("old", "new"):
      trees[side] = Path(tmp) / side
      subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(trees[side]),
                      getattr(args, side)], check=True)
      for sub in ("models", "kernels"):  # what the package-dir mapping does for an install
        (trees[side] / "jaxspec" / sub).symlink_to(trees[side] / sub)
    try:
      for r in range(args.rounds):
        for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
          results[side].append(run_at(trees[side], args))
          print(side, results[side][-1], flush=True)
    finally:
      for t in trees.values():
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(t)])
  summary = {}
  for spec in args.methods.split():
    old = statistics.median(r[spec] for r in results["old"])
    new = statistics.median(r[spec] for r in results["new"])
    summary[spec] = {"old_tok_s": old, "new_tok_s": new, "new_over_old": new / old}
    print(f"{spec:<28} old {old:6.1f} tok/s  new {new:6.1f} tok/s  new/old {new / old:.3f}")
  report = {"old": args.old, "new": args.new, "cpu": platform.processor() or platform.machine(),
            "load_avg": list(os.getloadavg()), "rounds": results, "summary": summary,
            "max_new_tokens": args.max_new_tokens, "num_prompts": args.num_prompts}
  try:
    report["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
