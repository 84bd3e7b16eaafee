"""Reference outputs ("goldens") for SmolLM2-135M-Instruct from Hugging Face transformers + torch.

Loads the converted HF folder (`jaxspec.models.pull.resolve_model_path("smollm2-135m-instruct")`)
with `transformers.AutoModelForCausalLM` in fp32 on 2 CPU threads and, per prompt, records:

  prompt_ids     token ids fed to the model (raw text: tokenizer default; chat: template
                 rendered to text, then encoded with add_special_tokens=False)
  top50_ids      the 50 highest last-position logits, descending ...
  top50_logits   ... and their values (fp32)
  greedy_ids     `model.generate(do_sample=False, max_new_tokens=32)` continuation; EOS is
                 kept when produced and generation stops there

into `tests/goldens/smollm2-135m-instruct.json`, with the torch/transformers versions used.
jaxspec's tests compare its forward and greedy decoding against this file; torch is not a
jaxspec dependency and is imported only here.

Re-run (from the repo root; the pin picks a local CPU wheel, never install an unpinned torch):

    pip install torch==2.13.0 && python experiments/make_goldens.py

Options: --model NAME_OR_FOLDER, --out PATH, --max-new-tokens N.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "goldens" / "smollm2-135m-instruct.json"

LONG_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than scribes copying by hand. Before his invention, most books in Europe "
    "were handwritten manuscripts, expensive to make and owned mainly by monasteries, universities and "
    "wealthy families. Within a few decades, printing shops had spread to more than two hundred cities, "
    "and millions of volumes were in circulation. The lower cost of books helped literacy grow, allowed "
    "scientists to share their results accurately, and made it possible for new religious and political "
    "ideas to travel quickly across borders. Historians often describe the printing press as one of the "
    "most important inventions of the second millennium, because"
)

# (name, kind, text): kind "raw" encodes the text as is; "chat" wraps it in the chat template.
PROMPTS = [
    ("capital_france", "raw", "The capital of France is"),
    ("count", "raw", "One, two, three, four, five,"),
    ("chat_photosynthesis", "chat", "Explain photosynthesis in one sentence."),
    ("chat_python", "chat", "Write a Python function that returns the square of a number."),
    ("chat_translate", "chat", "Translate to French: The weather is nice today."),
    ("long_printing_press", "raw", LONG_TEXT),
]


def encode(tokenizer, kind: str, text: str) -> list[int]:
  if kind == "raw":
    return list(tokenizer.encode(text))
  rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
  return list(tokenizer.encode(rendered, add_special_tokens=False))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct", help="registered name or HF folder")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  ap.add_argument("--max-new-tokens", type=int, default=32)
  args = ap.parse_args(argv)

  try:
    import torch
  except ImportError:
    print("torch is needed for the goldens only: pip install torch==2.13.0", file=sys.stderr)
    return 1
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from jaxspec.models.pull import resolve_model_path

  torch.set_num_threads(2)
  folder = Path(resolve_model_path(args.model))
  tokenizer = AutoTokenizer.from_pretrained(str(folder))
  model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
  eos_id = model.generation_config.eos_token_id
  eos_ids = set(eos_id if isinstance(eos_id, list) else [eos_id]) - {None}

  records = []
  for name, kind, text in PROMPTS:
    ids = encode(tokenizer, kind, text)
    x = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(x)
    with torch.no_grad():
      logits = model(input_ids=x, attention_mask=mask).logits[0, -1].float()
      top = torch.topk(logits, 50)
      out = model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id)
    greedy = out[0, len(ids):].tolist()
    for i, t in enumerate(greedy):  # generate stops at EOS; cut defensively, keep the EOS itself
      if t in eos_ids:
        greedy = greedy[: i + 1]
        break
    records.append({
        "name": name, "kind": kind, "text": text,
        "prompt_ids": ids,
        "top50_ids": top.indices.tolist(),
        "top50_logits": [float(v) for v in top.values.tolist()],
        "greedy_ids": greedy,
        "greedy_text": tokenizer.decode(greedy, skip_special_tokens=False),
    })
    print(f"{name:22s} {len(ids):4d} prompt tokens -> {len(greedy):2d} new: {records[-1]['greedy_text']!r}")

  capital = next(r for r in records if r["name"] == "capital_france")
  if "Paris" not in capital["greedy_text"]:
    print("WARNING: greedy continuation of 'The capital of France is' does not mention Paris", file=sys.stderr)

  doc = {
      "model": args.model,
      "source": "transformers AutoModelForCausalLM, fp32, CPU, torch.set_num_threads(2)",
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "python": platform.python_version()},
      "max_new_tokens": args.max_new_tokens,
      "eos_ids": sorted(eos_ids),
      "prompts": records,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(doc, indent=1) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
