"""LUD: speed and quality in one process, against the fine-tuned model's own AR and the base.

Per held-out prompt (13 categories x 2, never distilled), batch 1, greedy, `--new` tokens,
interleaved (every configuration runs on a prompt before the next prompt):
* speed: tokens/s (compile excluded: a warm-up call per configuration), MAT, tokens/forward;
* quality of the output: token agreement with the fine-tuned model's AR output (position-wise,
  and the exact-prefix length), perplexity under the *base* model, repetition (share of
  repeated 4-grams);
* did the fine-tune hurt the model: perplexity of the prompt text and of the base model's own
  AR continuations under the fine-tuned model vs the base.
Writes experiments/results/lud_bench.json (+ .png: speed against quality per configuration).

    python experiments/lud_bench.py --adapters runs/lud-lora-k4 --prompts ../shared/data/spec_bench_dev.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "lud_bench.json"
CONFIGS = "lud:beta=0.5 lud:beta=0.7 lud:beta=0.9 lud:beta=0.7,no_repeat=4 lud:beta=0.3,verify=True"


def nll_fn(bundle):
  """Mean NLL of `ids[start:]` given the rest, under `bundle`'s model (teacher forced)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef = bundle.graphdef

  @jax.jit
  def token_nll(params, toks_1xS):
    S = toks_1xS.shape[1]
    logits, _, _ = nnx.merge(graphdef, params)(None, toks_1xS, jnp.arange(S)[None], None)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, toks_1xS[0, 1:, None], -1)[:, 0]

  def nll(params, ids, start):
    S = int(np.ceil(len(ids) / 64) * 64)
    toks = np.zeros((1, S), np.int32)
    toks[0, :len(ids)] = ids
    per = np.asarray(token_nll(params, toks))[:len(ids) - 1]
    return float(per[start - 1:].mean()) if len(ids) > start else float("nan")

  return nll


def repeated_4grams(ids) -> float:
  grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--adapters", default=None, help="LUD adapters folder (default: packaged)")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--per-category", type=int, default=2)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--configs", default=CONFIGS, help="lud configurations beside AR, e.g. 'lud:k=2,beta=0.5 lud:beta=0.9'")
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  import jaxspec
  from jaxspec.bench import load_prompts
  from jaxspec.machine import describe, machine_info
  from jaxspec.methods import parse_method_list
  from jaxspec.methods.lud import LUD
  from jaxspec.profiling import forward_time_curve

  base = jaxspec.load_model(args.model, progress=False)
  lud = LUD(adapters=args.adapters).resolve(base)
  tuned = dataclasses.replace(base, params=lud.target_params(base), method_memory={}, path=None)
  fixed = dict(adapters="none", placeholder=lud.placeholder, k=lud.k)  # a config's k (< the trained k) overrides
  prompts = load_prompts(args.prompts, per_category=args.per_category)
  machine = machine_info()
  curve = forward_time_curve(base, [1, 2, 4, 8])
  print(describe(machine), "| forward time / T=1:", {t: round(v / curve[1], 2) for t, v in curve.items()})
  nll = nll_fn(base)
  configs = [("ar", {})] + [(m, o) for m, o, _ in parse_method_list(args.configs)]
  if any(m != "lud" for m, _ in configs[1:]):
    ap.error("--configs takes lud configurations only (AR always runs)")
  label = lambda m, o: m + (":" + ",".join(f"{k}={v}" for k, v in o.items()) if o else "")
  run = lambda bundle, p, m, o: jaxspec.generate(bundle, [p], method=m, max_new_tokens=args.new,
                                                 method_options=dict(fixed, **o) if m == "lud" else o)
  compile_s = {}
  for m, o in configs:  # warm-up: compile once per configuration
    compile_s[label(m, o)] = run(tuned, prompts[0]["prompt"], m, o).stats.compile_s
  base_ar_compile = run(base, prompts[0]["prompt"], "ar", {}).stats.compile_s
  rows = []
  for i, pr in enumerate(prompts):
    ids = jaxspec.encode_prompts(base, [pr["prompt"]])[0]
    base_out = run(base, pr["prompt"], "ar", {})
    row = {"id": pr["id"], "category": pr["category"], "prompt_tokens": len(ids),
           "prompt_nll_base": nll(base.params, ids, 1), "prompt_nll_tuned": nll(tuned.params, ids, 1),
           "base_ar_nll_base": nll(base.params, ids + base_out.token_ids[0], len(ids)),
           "base_ar_nll_tuned": nll(tuned.params, ids + base_out.token_ids[0], len(ids)),
           "base_ar_tok_s": base_out.stats.tokens_per_s, "runs": {}}
    ref = None
    for m, o in configs:
      r = run(tuned, pr["prompt"], m, o)
      out = r.token_ids[0]
      ref = out if m == "ar" else ref
      n = min(len(out), len(ref))
      prefix = next((j for j in range(n) if out[j] != ref[j]), n)
      row["runs"][label(m, o)] = {
          "tok_s": r.stats.tokens_per_s, "mat": r.stats.tokens_per_forward, "fwd_size": r.stats.mean_forward_size,
          "tokens": len(out), "agree": float(np.mean([a == b for a, b in zip(out, ref)])) if n else 0.0,
          "exact_prefix": prefix, "nll_base": nll(base.params, ids + out, len(ids)), "rep4": repeated_4grams(out)}
    rows.append(row)
    print(f"[{i + 1}/{len(prompts)}] {pr['category']}: " + " ".join(
        f"{k}={v['tok_s'] / row['runs']['ar']['tok_s']:.2f}x/{v['mat']:.2f}" for k, v in row["runs"].items()), flush=True)

  def summary(rs):
    out = {}
    for key in rs[0]["runs"]:
      speed = [r["runs"][key]["tok_s"] / r["runs"]["ar"]["tok_s"] for r in rs]
      tot = lambda f: sum(r["runs"][key][f] for r in rs)
      ppl = float(np.exp(np.mean([r["runs"][key]["nll_base"] for r in rs])))
      out[key] = {"speedup_median": float(np.median(speed)), "speedup_mean": float(np.mean(speed)),
                  "speedup_min": float(np.min(speed)), "mat": float(np.mean([r["runs"][key]["mat"] for r in rs])),
                  "agree_with_tuned_ar": float(np.mean([r["runs"][key]["agree"] for r in rs])),
                  "exact_prefix_mean": tot("exact_prefix") / len(rs), "ppl_under_base": ppl,
                  "rep4": float(np.mean([r["runs"][key]["rep4"] for r in rs]))}
    return out

  cats = sorted({r["category"] for r in rows})
  report = {"machine": machine, "forward_curve": {str(t): v for t, v in curve.items()}, "adapters": lud.adapters,
            "placeholder": lud.placeholder, "k": lud.k, "new_tokens": args.new, "prompts": len(rows),
            "compile_s": compile_s, "base_ar_compile_s": base_ar_compile,
            "fine_tune_effect": {
                "prompt_ppl_base": float(np.exp(np.mean([r["prompt_nll_base"] for r in rows]))),
                "prompt_ppl_tuned": float(np.exp(np.mean([r["prompt_nll_tuned"] for r in rows]))),
                "base_ar_text_ppl_base": float(np.exp(np.mean([r["base_ar_nll_base"] for r in rows]))),
                "base_ar_text_ppl_tuned": float(np.exp(np.mean([r["base_ar_nll_tuned"] for r in rows]))),
                "tuned_ar_vs_base_ar_speed": float(np.median([r["runs"]["ar"]["tok_s"] / r["base_ar_tok_s"] for r in rows]))},
            "overall": summary(rows),
            "natural_language": summary([r for r in rows if r["category"] != "coding"]),
            "by_category": {c: summary([r for r in rows if r["category"] == c]) for c in cats},
            "rows": rows, "written": time.strftime("%Y-%m-%d %H:%M")}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1))
  for key, s in report["overall"].items():
    print(f"{key:32s} {s['speedup_median']:.2f}x (min {s['speedup_min']:.2f}) MAT {s['mat']:.2f} "
          f"agree {s['agree_with_tuned_ar']:.2f} ppl(base) {s['ppl_under_base']:.2f} rep4 {s['rep4']:.3f}")
  print("fine-tune effect:", report["fine_tune_effect"])
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, s in report["overall"].items():
      ax.scatter(s["ppl_under_base"], s["speedup_median"])
      ax.annotate(key.replace("lud:", ""), (s["ppl_under_base"], s["speedup_median"]), fontsize=7)
    ax.set_xlabel("perplexity of the output under the base model"), ax.set_ylabel("speedup over the tuned AR (median)")
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=100)
  except ImportError:
    pass
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
