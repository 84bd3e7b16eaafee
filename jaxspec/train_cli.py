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
  h.add_argument("--data", required=True, nargs="+", help="`jaxspec distill` folders (e.g. greedy and sampled)")
  h.add_argument("--layer", type=int, default=26, help="transfer layer t: heads read the residual after t blocks")
  h.add_argument("--heads", type=int, default=4, help="k: pseudo tokens (draft depth)")
  h.add_argument("--token-input", action="store_true", help="heads also read the pending token's embedding")
  h.add_argument("--window", type=int, default=256, help="tokens of each sequence used (its last ones)")
  h.add_argument("--top-k", type=int, default=32, help="teacher log-probs kept per position")
  h.add_argument("--draft-vocab", type=int, default=16384, help="tokens the heads rank drafts over (most frequent "
                                                               "in the data first; 0: the whole vocabulary)")
  _schedule_options(h, steps=3000, batch_size=(64, "anchors per step"), lr=(1e-3, None), warmup=100, every=(250, 250))
  h.add_argument("--workdir", default=None, help="checkpoints, log, curve (default: OUT.work); the teacher "
                                                 "store is kept in the --data folder")
  h.add_argument("--out", required=True, help="heads folder to write (params.safetensors + meta.json)")
  h.set_defaults(func=_train_hidden_transfer)

  u = tsub.add_parser("lud", help="fine-tune for Lexical Unit Decoding on a distill folder (resumable)")
  u.add_argument("--model", default=DEFAULT_MODEL)
  u.add_argument("--data", required=True, nargs="+", help="`jaxspec distill` folders (e.g. greedy and sampled)")
  u.add_argument("--mode", choices=("lora", "full"), default="lora",
                 help="lora: low-rank adapters (a small params file); full: every weight (a model folder)")
  u.add_argument("--k", type=int, default=4, help="longest unit: tokens one decode step can commit")
  u.add_argument("--alpha", type=float, default=0.8, help="mining threshold on P(token | prefix)")
  u.add_argument("--rank", type=int, default=8)
  u.add_argument("--window", type=int, default=224, help="tokens of each sequence used (its last ones)")
  u.add_argument("--budget", type=int, default=64, help="placeholder slots per example")
  _schedule_options(u, steps=300, batch_size=(4, "sequences per step"), lr=(None, "default 1e-3 (lora) / 3e-5 (full)"),
                    warmup=20, every=(50, 25))
  u.add_argument("--stop-after", type=int, default=None,
                 help="checkpoint and stop at this step of the schedule (rerun without it to finish)")
  u.add_argument("--workdir", default=None, help="checkpoints, log, curve (default: OUT.work)")
  u.add_argument("--out", required=True, help="lora: adapters folder (params.safetensors + meta.json); "
                                              "full: a model folder")
  u.set_defaults(func=_train_lud)

  m = sub.add_parser("lud", help="Lexical Unit Decoding tools: mine units, export a fine-tuned model folder")
  msub = m.add_subparsers(dest="what", required=True)
  mi = msub.add_parser("mine", help="units of a distill folder under the base model: statistics + plot")
  mi.add_argument("--model", default=DEFAULT_MODEL)
  mi.add_argument("--data", required=True, nargs="+", help="`jaxspec distill` folders")
  mi.add_argument("--alphas", default="0.5,0.7,0.8,0.9,0.95", help="mining thresholds to report")
  mi.add_argument("--alpha", type=float, default=0.8, help="the threshold whose units are saved")
  mi.add_argument("--k", type=int, default=4)
  mi.add_argument("--window", type=int, default=224)
  mi.add_argument("--out", required=True, help="folder: units.jsonl, stats.json, units.png")
  mi.set_defaults(func=_lud_mine)
  ex = msub.add_parser("export", help="base model + LUD adapters -> a Hugging Face model folder")
  ex.add_argument("--model", default=DEFAULT_MODEL)
  ex.add_argument("--adapters", default=None, help="adapters folder (default: the packaged ones)")
  ex.add_argument("--out", required=True)
  ex.set_defaults(func=_lud_export)


def _schedule_options(p, *, steps: int, batch_size: tuple, lr: tuple, warmup: int, every: tuple):
  """The trainer's schedule options (jaxspec.train.TrainConfig) with a command's defaults;
  batch_size and lr are (default, help), every is (eval every, save every)."""
  p.add_argument("--steps", type=int, default=steps)
  p.add_argument("--batch-size", type=int, default=batch_size[0], help=batch_size[1])
  p.add_argument("--lr", type=float, default=lr[0], help=lr[1])
  p.add_argument("--warmup-steps", type=int, default=warmup)
  p.add_argument("--eval-every", type=int, default=every[0])
  p.add_argument("--save-every", type=int, default=every[1])
  p.add_argument("--seed", type=int, default=0)


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
  from jaxspec.distill import read_distilled
  from jaxspec.heads_file import save_params_file
  from jaxspec.train import TrainConfig
  from jaxspec.train.hidden_transfer import load_or_build_store, train_heads

  bundle = jaxspec.load_model(args.model)
  manifest, rows = read_distilled(args.data, bundle)
  workdir = Path(args.workdir or f"{args.out}.work")
  store = load_or_build_store(bundle, rows, args.layer, args.window, args.top_k, args.data[0])  # shared by runs
  cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                    eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
  data_manifest = {**manifest, "sequences": len(rows), "window": args.window, "top_k": args.top_k}
  groups = [str(r["question_id"]) for r in rows]
  heads, _, meta = train_heads(bundle, store, args.heads, cfg, workdir, data_manifest=data_manifest,
                               seq_groups=groups if len(set(groups)) < len(groups) else None,
                               token_input=args.token_input)
  import numpy as np
  from jaxspec.train.hidden_transfer import draft_vocabulary
  arrays = {n: np.asarray(v) for n, v in heads.items()}
  if args.draft_vocab:
    arrays["vocab_N"] = draft_vocabulary([r["output_ids"] for r in rows], bundle.config.vocab_size, args.draft_vocab)
    meta["draft_vocab"] = args.draft_vocab
  save_params_file(args.out, arrays, meta)
  top1 = " ".join(f"{a:.2f}" for a in meta["eval"]["top1_by_offset"])
  print(f"wrote {args.out}: layer {args.layer}, k {args.heads}, eval top-1 by offset {top1}")
  return 0


def _train_lud(args) -> int:
  import jaxspec
  from jaxspec.distill import read_distilled
  from jaxspec.heads_file import save_params_file
  from jaxspec.train import TrainConfig
  from jaxspec.train.lud import LudConfig, export_folder, train_lud

  bundle = jaxspec.load_model(args.model)
  manifest, rows = read_distilled(args.data, bundle)
  cfg = LudConfig(k=args.k, alpha=args.alpha, mode=args.mode, rank=args.rank, window=args.window, budget=args.budget)
  lr = args.lr if args.lr is not None else (1e-3 if args.mode == "lora" else 3e-5)
  tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=args.warmup_steps,
                     eval_every=args.eval_every, eval_batches=4, save_every=args.save_every, seed=args.seed)
  trained, _, meta = train_lud(bundle, rows, cfg, tcfg, Path(args.workdir or f"{args.out}.work"),
                               data_manifest={**manifest, "sequences": len(rows)}, stop_after=args.stop_after)
  if args.stop_after is not None and args.stop_after < args.steps:
    print(f"stopped at step {args.stop_after} of {args.steps}; rerun without --stop-after to finish")
    return 0
  if args.mode == "lora":
    import numpy as np
    save_params_file(args.out, {n: np.asarray(v) for n, v in trained.items()}, meta, dtype=np.float16)
  else:
    from jaxspec.train import lora
    from jaxspec.train.lud import canonical
    _, params = canonical(bundle)
    names, _, treedef = lora.named_leaves(params)
    import jax
    export_folder(bundle, jax.tree_util.tree_unflatten(treedef, [trained[n] for n in names]), meta, args.out)
  ev = meta["eval"]
  print(f"wrote {args.out} ({args.mode}): eval AR loss {ev.get('eval_ar_loss', float('nan')):.3f}, "
        f"unit loss {ev.get('eval_unit_loss', float('nan')):.3f}, unit top-1 {ev.get('eval_top1_unit', float('nan')):.3f}")
  return 0


def _lud_mine(args) -> int:
  import json
  import jaxspec
  from jaxspec.distill import read_distilled
  from jaxspec.train.lud import corpus
  from jaxspec.train.lud_units import mine_units, mining_report, plot_report, save_units, token_confidence
  bundle = jaxspec.load_model(args.model)
  manifest, rows = read_distilled(args.data, bundle)
  sequences, categories = corpus(rows, args.window)
  conf = token_confidence(bundle, sequences)
  alphas = sorted({float(a) for a in args.alphas.split(",")} | {args.alpha})
  report = mining_report(conf, categories, alphas, args.k)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  units = [mine_units(p, am, args.alpha, args.k) for p, am in conf]
  save_units(out / "units.jsonl", [dict(r, tokens=s) for r, s in zip(rows, sequences)], units,
             {"model": bundle.name, "alpha": args.alpha, "k": args.k, "window": args.window, "data": manifest})
  (out / "stats.json").write_text(json.dumps({"k": args.k, "window": args.window, "by_alpha": report}, indent=1))
  plot_report(report, out / "units.png", args.k)
  for a in alphas:
    o = report[str(a)]["overall"]
    print(f"alpha {a}: {o['share_in_multi_token_units']:.1%} of tokens in multi-token units, "
          f"mean unit {o['mean_unit_length']:.2f} tokens, lengths {o['length_hist'][1:]}")
  return 0


def _lud_export(args) -> int:
  import jaxspec
  from jaxspec.methods.lud import LUD
  from jaxspec.train.lud import export_folder
  from jaxspec.heads_file import read_meta
  bundle = jaxspec.load_model(args.model)
  m = LUD(adapters=args.adapters).resolve(bundle)
  export_folder(bundle, m.target_params(bundle), read_meta(m.adapters), args.out)
  print(f"wrote {args.out}: {bundle.name} with the LUD adapters of {m.adapters} merged "
        f"(`jaxspec generate --model {args.out} --method lud`)")
  return 0
