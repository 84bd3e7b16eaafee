"""Forward time of every T from 1 to 24 tokens (decode forward after 128 committed tokens, batch 1),
timed in the same interleaved rounds, twice: where does one more token cost nothing?

On the Xeon 6/167 (AVX-512/AMX) the cost rises in steps: T = 9..12, 13..16, 17..20 and 21..24
each cost about the same, so a tree of 13 tokens pays for 16. Sizes at the end of a step are
the ones worth running (experiments/LOG.md, session 16). The disk-cached curve the sizing reads
is not touched.

    python experiments/forward_plateaus.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "forward_plateaus.json"


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--max-tokens", type=int, default=24)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  import os

  import jaxspec
  from jaxspec.machine import machine_info
  from jaxspec.profiling import _measure

  bundle = jaxspec.load_model(args.model, progress=False)
  sizes = list(range(1, args.max_tokens + 1))
  runs = []
  for _ in range(args.rounds):
    t = _measure(bundle, sizes, 128, 15)
    runs.append({"t1_ms": round(t[1] * 1e3, 2), "ratio": {s: round(t[s] / t[1], 3) for s in sizes}})
    print(runs[-1], flush=True)
  report = {"machine": machine_info(), "load_avg": list(os.getloadavg()), "context": 128, "runs": runs}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
