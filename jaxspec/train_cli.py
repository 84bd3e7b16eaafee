"""`jaxspec distill` and `jaxspec train hidden-transfer`: the self-distillation pipeline.

    jaxspec distill --prompts experiments/data/distill_prompts.jsonl --out runs/distill
    jaxspec train hidden-transfer --data runs/distill --layer 26 --heads 4 --out runs/heads

Both resume where an interrupted run stopped (distill skips finished prompts; training restores
its latest checkpoint; the teacher store is kept in the workdir).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_train_parsers(sub) -> None:
  p = sub.add_parser("distill", help="store the base model's own continuations of a prompt file (resumable)")
  p.add_argument("--model", default=DEFAULT_MODEL)
  p.add_argument("--prompts", required=True, help="Spec-Bench style JSONL (question_id, category, turns)")
  p.add_argument("--out", required=True, help="output folder (sequences.jsonl + manifest.json)")
  p.add_argument("--max-new-tokens", type=int, default=192)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--exclude-from", default=None,
                 help="a prompt file whose first --exclude-per-category prompts per category are held out")
  p.add_argument("--exclude-per-category", type=int, default=2)
  p.add_argument("--dtype", default=None)
  p.set_defaults(func=_distill)

  t = sub.add_parser("train", help="train a method's parameters")
  tsub = t.add_subparsers(dest="what", required=True)
  h = tsub.add_parser("hidden-transfer", help="hidden-transfer heads by self-distillation (resumable)")
  h.add_argument("--model", default=DEFAULT_MODEL)
  h.add_argument("--data", required=True, help="a `jaxspec distill` folder")
  h.add_argument("--layer", type=int, default=26, help="transfer layer t: heads read the residual after t blocks")
  h.add_argument("--heads", type=int, default=4, help="k: pseudo tokens (draft depth)")
  h.add_argument("--window", type=int, default=256, help="tokens of each sequence used (its last ones)")
  h.add_argument("--top-k", type=int, default=32, help="teacher log-probs kept per position")
  h.add_argument("--steps", type=int, default=3000)
  h.add_argument("--batch-size", type=int, default=64, help="anchors per step")
  h.add_argument("--lr", type=float, default=1e-3)
  h.add_argument("--warmup-steps", type=int, default=100)
  h.add_argument("--eval-every", type=int, default=250)
  h.add_argument("--save-every", type=int, default=250)
  h.add_argument("--seed", type=int, default=0)
  h.add_argument("--workdir", default=None, help="checkpoints, log, curve (default: OUT.work); the teacher "
                                                 "store is kept in the --data folder")
  h.add_argument("--out", required=True, help="heads folder to write (params.safetensors + meta.json)")
  h.set_defaults(func=_train_hidden_transfer)


def _held_out_ids(path, per_category: int) -> set:
  from jaxspec.bench import load_prompts
  return {p["id"] for p in load_prompts(path, per_category=per_category)}


def _distill(args) -> int:
  import jaxspec
  from jaxspec.distill import distill
  exclude = _held_out_ids(args.exclude_from, args.exclude_per_category) if args.exclude_from else set()
  bundle = jaxspec.load_model(args.model, dtype=args.dtype)
  manifest = distill(bundle, args.prompts, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     temperature=args.temperature, exclude_ids=exclude)
  print(f"distilled {args.prompts} with {manifest['model']} into {args.out}")
  return 0


def _train_hidden_transfer(args) -> int:
  import jaxspec
  from jaxspec.distill import read_manifest, read_sequences
  from jaxspec.errors import InvalidOptionError
  from jaxspec.heads_file import model_fingerprint, save_params_file
  from jaxspec.train import TrainConfig
  from jaxspec.train.hidden_transfer import load_or_build_store, train_heads

  manifest = read_manifest(args.data)
  rows = read_sequences(args.data)
  if not rows:
    raise InvalidOptionError(f"{args.data} holds no distilled sequences; run `jaxspec distill` first")
  bundle = jaxspec.load_model(args.model)
  if manifest["model_fingerprint"] != model_fingerprint(bundle):
    raise InvalidOptionError(f"{args.data} was distilled from {manifest['model']!r} ({manifest['model_fingerprint']}), "
                             f"not this {bundle.name!r}; distill with --model {args.model}")
  workdir = Path(args.workdir or f"{args.out}.work")
  store = load_or_build_store(bundle, rows, args.layer, args.window, args.top_k, args.data)  # shared by runs
  cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                    eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
  data_manifest = {**manifest, "sequences": len(rows), "window": args.window, "top_k": args.top_k}
  heads, _, meta = train_heads(bundle, store, args.heads, cfg, workdir, data_manifest=data_manifest)
  import numpy as np
  save_params_file(args.out, {n: np.asarray(v) for n, v in heads.items()}, meta)
  top1 = " ".join(f"{a:.2f}" for a in meta["eval"]["top1_by_offset"])
  print(f"wrote {args.out}: layer {args.layer}, k {args.heads}, eval top-1 by offset {top1}")
  return 0
