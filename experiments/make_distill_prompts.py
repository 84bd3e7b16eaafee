"""Build experiments/data/distill_prompts.jsonl: the prompts trained drafters are distilled on,
none of which the benchmark uses.

Sources (see experiments/data/README.md for packages, versions, sha256 and licenses):
  * the Spec-Bench dev file minus its first HELD_OUT prompts per category (those are what
    `jaxspec bench --per-category 2` measures on);
  * HumanEval problems 0..HUMANEVAL_TRAIN-1 (the rest stay unseen for code checks);
  * MT-Bench first turns, minus any whose text is a held-out dev prompt.

    python experiments/make_distill_prompts.py DEV.jsonl HUMANEVAL.jsonl MT_BENCH.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELD_OUT = 2
HUMANEVAL_TRAIN = 100
OUT = Path(__file__).resolve().parent / "data" / "distill_prompts.jsonl"


def main(dev: str, humaneval: str, mt_bench: str) -> int:
  read = lambda p: [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]
  rows, seen, held = [], {}, set()
  for r in read(dev):
    seen[r["category"]] = seen.get(r["category"], 0) + 1
    if seen[r["category"]] <= HELD_OUT:
      held.add(r["turns"][0].strip())
    else:
      rows.append({"question_id": f"dev-{r['question_id']}", "category": r["category"], "turns": r["turns"][:1]})
  rows += [r for r in read(humaneval) if int(r["question_id"].split("-")[1]) < HUMANEVAL_TRAIN]
  rows += [r for r in read(mt_bench) if r["turns"][0].strip() not in held]
  texts, unique = set(), []
  for r in rows:  # the dev file's MT-Bench categories are MT-Bench questions: keep one copy
    if r["turns"][0].strip() not in texts:
      texts.add(r["turns"][0].strip())
      unique.append(r)
  rows = unique
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  print(f"wrote {OUT}: {len(rows)} prompts ({len(held)} dev prompts held out)")
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
