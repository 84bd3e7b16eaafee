"""Forward time vs tokens for the two weight layouts on this device (one process, interleaved).

    python experiments/bench_layout.py [--sizes 1,2,4,8,16,32,64] [--rounds 3]

Writes experiments/results/layout_curve.json. See models/cpu_layout.py for why.
"""

import argparse
import json
import os
from pathlib import Path

import jaxspec
from jaxspec.profiling import forward_time_curve


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--sizes", default="1,2,4,8,9,16,17,33,64")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "layout_curve.json"))
  a = ap.parse_args()
  sizes = [int(s) for s in a.sizes.split(",")]
  plain = jaxspec.load_model(a.model, progress=False)
  dual = jaxspec.load_model(a.model, progress=False, few_token_layout=True)
  best = {"in_out": {}, "dual": {}}
  for _ in range(a.rounds):  # interleave rounds so machine load hits both alike
    for name, b in (("in_out", plain), ("dual", dual)):
      b.method_memory.clear()
      for t, s in forward_time_curve(b, sizes).items():
        best[name][t] = min(best[name].get(t, 1e9), s)
  print(f"{'T':>4} {'[in,out] ms':>12} {'dual ms':>9} {'ratio':>6}   (load {os.getloadavg()[0]:.1f})")
  for t in sizes:
    print(f"{t:>4} {best['in_out'][t] * 1e3:12.1f} {best['dual'][t] * 1e3:9.1f} {best['in_out'][t] / best['dual'][t]:6.2f}")
  Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  Path(a.out).write_text(json.dumps({"load_avg": os.getloadavg(), "ms": {k: {str(t): v * 1e3 for t, v in d.items()}
                                                                           for k, d in best.items()}}, indent=1))


if __name__ == "__main__":
  main()
