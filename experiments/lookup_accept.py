"""Prompt lookup's acceptance by matched n-gram length, from greedy text alone (no model run).

A greedy lossless decode commits exactly the model's greedy continuation, so a lookup draft's
accepted length at a step is its common prefix with the continuation that follows. Over
distilled greedy sequences (prompt + output, `jaxspec distill`; never the bench prompts), for
every output position: the longest n <= 3 whose last n tokens occur earlier, the `depth` tokens
after that occurrence, and how many of them match what came next. Reports per n: the share of
steps and P(depth d accepted | depth d-1 accepted), the priors of
`jaxspec.methods.prompt_lookup.PRIOR_ACCEPT_BY_NGRAM`.

    python experiments/lookup_accept.py runs/distill [--max-new 128] [--depth 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "lookup_accept.json"


def latest_match(tokens: list[int], num: int, max_ngram: int) -> tuple[int, int]:
  """(n, start of the continuation) of the longest n-gram ending at num - 1 that occurs earlier
  (latest occurrence), or (0, -1). Same rule as `lookup_continuation`."""
  for n in range(max_ngram, 0, -1):
    if num < n + 1:
      continue
    tail = tokens[num - n:num]
    for j in range(num - n - 1, -1, -1):
      if tokens[j:j + n] == tail:
        return n, j + n
  return 0, -1


def accepted_by_ngram(sequences, max_new: int, depth: int, max_ngram: int = 3) -> dict:
  """n -> [depth + 1] histogram of accepted draft lengths (n = 0: no match)."""
  hist = {n: np.zeros(depth + 1, np.int64) for n in range(max_ngram + 1)}
  for prompt, output in sequences:
    full = list(prompt) + list(output[:max_new])
    for num in range(len(prompt) + 1, len(full)):
      n, start = latest_match(full, num, max_ngram)
      accepted = 0
      if n:
        draft, truth = full[start:min(start + depth, num)], full[num:num + depth]
        while accepted < min(len(draft), len(truth)) and draft[accepted] == truth[accepted]:
          accepted += 1
      hist[n][accepted] += 1
  return hist


def conditional_accept(hist: np.ndarray) -> list[float]:
  """P(depth d accepted | depth d - 1 accepted), d = 1..len(hist) - 1."""
  reach = [hist[d:].sum() for d in range(len(hist))]
  return [float(reach[d] / reach[d - 1]) if reach[d - 1] else 0.0 for d in range(1, len(hist))]


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("folders", nargs="+", help="distilled folders (sequences.jsonl with prompt_ids, output_ids)")
  ap.add_argument("--max-new", type=int, default=128, help="output tokens per sequence used (the bench's length)")
  ap.add_argument("--depth", type=int, default=8)
  ap.add_argument("--out", default=str(OUT))
  a = ap.parse_args()
  seqs = []
  for folder in a.folders:
    with open(Path(folder) / "sequences.jsonl") as f:
      seqs += [(d["prompt_ids"], d["output_ids"]) for d in map(json.loads, f)]
  hist = accepted_by_ngram(seqs, a.max_new, a.depth)
  steps = sum(h.sum() for h in hist.values())
  report = {"folders": a.folders, "sequences": len(seqs), "max_new": a.max_new, "steps": int(steps), "by_ngram": {}}
  for n, h in hist.items():
    cond = conditional_accept(h) if n else []
    report["by_ngram"][str(n)] = {"share": float(h.sum() / steps), "histogram": h.tolist(), "conditional_accept": cond}
    print(f"n={n}: {h.sum() / steps:5.1%} of steps; P(accept depth d | d-1) " + " ".join(f"{c:.2f}" for c in cond))
  Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
