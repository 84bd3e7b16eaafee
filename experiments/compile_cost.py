"""Compile time of a method's decode loop with and without pay-per-draft branches (issue target:
the extra `lax.switch` branches at most double it).

Each spec runs in its own process with an empty XLA compilation cache, so nothing is reused
between them; the figure is `GenerateStats.compile_s` of one `generate` call (prefill + loop),
median of `--rounds` processes.

    python experiments/compile_cost.py [--rounds 2] [--out experiments/results/compile_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECS = ["ar", "pld:k=8,adaptive=False", "pld:k=8", "recycling:template=tiny,lookup=5,adaptive=False", "auto",
         "recycling:template=small,adaptive=False", "recycling:template=small"]
CHILD = """
import json, sys
import jaxspec
from jaxspec.methods import parse_method_spec
name, opts, _ = parse_method_spec(sys.argv[1])
b = jaxspec.load_model(sys.argv[2], progress=False)
s = jaxspec.generate(b, ["Name three colours."], method=name, method_options=opts, max_new_tokens=8).stats
print(json.dumps({"compile_s": s.compile_s}))
"""


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--specs", default=";".join(SPECS))
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "compile_cost.json"))
  a = ap.parse_args()
  from jaxspec.machine import machine_info
  times = {}
  for spec in a.specs.split(";"):
    runs = []
    for _ in range(a.rounds):
      with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", CHILD, spec, a.model], env=env, capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["compile_s"])
    times[spec] = statistics.median(runs)
    print(f"{spec:50s} compile {times[spec]:6.1f} s  (runs {', '.join(f'{r:.1f}' for r in runs)})", flush=True)
  report = {"model": a.model, "machine": machine_info(), "rounds": a.rounds, "compile_s": times,
            "load_avg": os.getloadavg()}
  Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
