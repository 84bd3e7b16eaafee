"""Benchmark runner: methods x model x prompt file x max tokens x temperature, AR baseline in
the same process. Exposed as `jaxspec bench`.

For each method (AR first) one warm-up generate compiles it (compile time reported apart),
then every prompt runs alone (batch 1) through every method in turn (interleaved: machine drift
hits all methods alike; each keeps its own learned state between its calls) and its stats are kept. Per category and overall:
MAT (tokens / target forwards), per-position acceptance, tokens/s (tokens / wall time without
compilation), speedup over AR (ratio of those tokens/s, and the median of per-prompt ratios),
compile time. With `repeats` > 1 every prompt runs that many times per method (from the same
learned state each time) and its time is the median: per-prompt ratios on short outputs swing
+-10% on a noisy machine otherwise. Writes a JSON file, prints a table, optionally a matplotlib
plot, and the device's forward-time curve (seconds per forward vs tokens in the forward).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InvalidOptionError
from jaxspec.machine import describe, machine_info
from jaxspec.methods import get_method, parse_method_list, parse_method_spec


def load_prompts(path: str | os.PathLike, categories=None, per_category: int = 2) -> list[dict]:
  """First-turn prompts from a Spec-Bench style JSONL (question_id, category, turns)."""
  path = Path(path)
  if not path.is_file():
    raise InvalidOptionError(f"prompt file {path} not found; pass --prompts PATH (Spec-Bench JSONL)")
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  chosen, seen = [], {}
  for r in rows:
    cat = r["category"]
    if categories and cat not in categories:
      continue
    if seen.get(cat, 0) < per_category:
      seen[cat] = seen.get(cat, 0) + 1
      chosen.append({"id": r["question_id"], "category": cat, "prompt": r["turns"][0]})
  if not chosen:
    raise InvalidOptionError(f"no prompts selected from {path} (categories={categories})")
  return chosen


def _summarise(runs: list[dict], ar_runs: list[dict] | None) -> dict:
  tokens = sum(r["new_tokens"] for r in runs)
  forwards = sum(r["forwards"] for r in runs)
  wall = sum(r["wall_s"] for r in runs)
  hist = np.sum([r["accept_hist"] for r in runs], axis=0) if runs else np.zeros(1)
  total = hist.sum()
  rates = [float(hist[k + 1:].sum() / total) if total else 0.0 for k in range(1, len(hist) - 1)]
  steps = sum(r.get("steps", 0) for r in runs)
  out = {"prompts": len(runs), "tokens": tokens, "forwards": forwards, "mat": tokens / max(forwards, 1),
         "mean_forward_tokens": sum(r.get("forward_tokens", 0) for r in runs) / steps if steps else 0.0,
         "wall_s": wall, "tokens_per_s": tokens / wall if wall else float("nan"), "accept_rates": rates}
  if ar_runs is not None:
    ar_tps = sum(r["new_tokens"] for r in ar_runs) / sum(r["wall_s"] for r in ar_runs)
    out["speedup"] = out["tokens_per_s"] / ar_tps
    ratios = [(r["new_tokens"] / r["wall_s"]) / (a["new_tokens"] / a["wall_s"]) for r, a in zip(runs, ar_runs)]
    out["speedup_median"] = float(statistics.median(ratios)) if ratios else float("nan")
    out["speedup_min"] = min(ratios) if ratios else float("nan")
    out["prompts_below_0.95"] = sum(r < 0.95 for r in ratios)
  return out


FORWARD_CURVE = (1, 2, 4, 8, 16)  # forward sizes whose times a bench records (the device's curve; cached)


def run_bench(model: str = "smollm2-135m-instruct", methods=("ar", "pld", "recycling"), prompts_path=None,
              categories=None, per_category: int = 2, max_new_tokens: int = 128, temperature: float = 0.0,
              top_p: float = 1.0, top_k: int = 0, seed: int = 0, dtype=None, forward_curve=FORWARD_CURVE,
              out: str | None = None, plot: str | None = None, mesh=None, progress: bool = True,
              warm_per_category: int = 0, repeats: int = 1) -> dict:
  """Run every method over the prompts (AR first, same process) and report MAT, speed, acceptance.

  Each method starts from empty learned state (e.g. Token Recycling's matrix) and is warmed by
  one untimed call. `warm_per_category` > 0 also runs it, untimed, on that many other prompts per
  category first: the steady state of a long-running server, the setting of the Token
  Recycling paper, whose matrix persists across queries. `repeats`: runs per prompt and method,
  each from the learned state the method had before the prompt (so a repeat never drafts from
  its own earlier output); the run's wall time is their median, the rest is the first run's.
  `forward_curve`: forward sizes whose times go into the report beside the machine (the curve the
  sizing reads, cached per model and device, re-timed at the start with every size already
  cached, so no method sizes its drafts by another day's or a busier process's timings; () to
  skip).
  """
  if repeats < 1:
    raise InvalidOptionError(f"repeats must be >= 1, got {repeats}")
  import jaxspec
  from jaxspec.api import reset_method_memory

  if plot:
    require_matplotlib()  # before the work, not after it
  bundle = jaxspec.load_model(model, dtype=dtype, progress=progress)
  if forward_curve:  # timed now, in this run's conditions: every method sizes its drafts by it
    from jaxspec.profiling import forward_time_curve
    forward_time_curve(bundle, list(forward_curve), refresh=True)
  prompts = load_prompts(prompts_path, categories, per_category)
  measured = {p["id"] for p in prompts}
  warm_prompts = [p for p in load_prompts(prompts_path, categories, per_category + warm_per_category)
                  if p["id"] not in measured] if warm_per_category else []
  specs = [parse_method_spec(m) if isinstance(m, str) else m for m in methods]
  if not specs or specs[0][0] != "ar":
    specs = [("ar", {}, "ar")] + [s for s in specs if s[2] != "ar"]
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
  if mesh is not None:
    kw["mesh"] = mesh
  results = OrderedDict()
  learned = {}  # label -> its learned state (method_memory[memory_key]) between its calls
  for name, opts, label in specs:
    t0 = time.perf_counter()
    # Every configuration starts from the same learned state (e.g. Token Recycling's adjacency
    # matrix): empty, then warmed by the one untimed call. Otherwise later configurations of a
    # method would inherit what earlier ones learned and the comparison would depend on order.
    reset_method_memory(bundle, name, **opts)
    # Warm with a prompt outside the measured set when there is one: a learned drafter that has
    # seen a measured prompt's own greedy output would predict it too well.
    first = warm_prompts[0] if warm_prompts else prompts[0]
    warm = jaxspec.generate(bundle, [first["prompt"]], method=name, method_options=opts, **kw)
    compile_s = warm.stats.compile_s
    for p in warm_prompts[1:]:
      compile_s += jaxspec.generate(bundle, [p["prompt"]], method=name, method_options=opts, **kw).stats.compile_s
    key = get_method(name, **opts).memory_key
    learned[label] = (key, bundle.method_memory.pop(key, None) if key else None)
    results[label] = {"method": name, "options": opts, "compile_s": compile_s, "runs": []}
    if progress:
      print(f"  {label}: compiled and warmed in {time.perf_counter() - t0:.1f}s", flush=True)
  # Interleaved: every configuration runs on a prompt before the next prompt, so a slow spell of
  # the machine hits them alike and per-prompt ratios compare like with like. Each keeps its own
  # learned state across its calls, exactly as if it ran alone.
  for i, p in enumerate(prompts):
    first, walls, forwards = {}, {label: [] for _, _, label in specs}, {label: [] for _, _, label in specs}
    for rep in range(repeats):
      for name, opts, label in specs:
        key, state = learned[label]
        if key:
          bundle.method_memory.pop(key, None)
          if state is not None:  # a copy while another repeat follows: generate donates its state
            bundle.method_memory[key] = jax.tree.map(jnp.copy, state) if rep < repeats - 1 else state
        r = jaxspec.generate(bundle, [p["prompt"]], method=name, method_options=opts, **kw)
        after = bundle.method_memory.pop(key, None) if key else None
        results[label]["compile_s"] += r.stats.compile_s  # a new prompt-length bucket compiles once more
        walls[label].append(r.stats.wall_s)
        forwards[label].append(sum(r.stats.forwards))
        if rep == 0:
          first[label] = (r, after)
    for name, opts, label in specs:
      r, after = first[label]
      key = learned[label][0]
      if key:
        learned[label] = (key, after)
      s = r.stats
      results[label]["runs"].append({"id": p["id"], "category": p["category"], "new_tokens": sum(s.new_tokens),
                                     "forwards": sum(s.forwards), "wall_s": statistics.median(walls[label]),
                                     "wall_s_repeats": walls[label], "forwards_repeats": forwards[label],
                                     "accept_hist": s.accept_hist,
                                     "steps": s.steps, "forward_tokens": s.forward_tokens,
                                     "token_ids": r.token_ids[0]})
    if progress:
      print(f"  prompt {i + 1}/{len(prompts)} ({p['category']}) done", flush=True)

  ar_runs = results["ar"]["runs"]
  cats = sorted({p["category"] for p in prompts})
  summary = OrderedDict()
  for label, res in results.items():
    per_cat = {c: _summarise([r for r in res["runs"] if r["category"] == c],
                             [a for a in ar_runs if a["category"] == c]) for c in cats}
    overall = _summarise(res["runs"], ar_runs)
    same = sum(r["token_ids"] == a["token_ids"] for r, a in zip(res["runs"], ar_runs))
    summary[label] = {"overall": overall, "categories": per_cat, "compile_s": res["compile_s"],
                      "identical_to_ar": f"{same}/{len(ar_runs)}"}
  curve = {}
  if forward_curve:
    from jaxspec.profiling import forward_time_curve
    curve = forward_time_curve(bundle, list(forward_curve))
  report = {
      "model": model, "dtype": str(bundle.dtype), "backend": jax.default_backend(),
      "device": str(jax.devices()[0]), "machine": machine_info(),
      "max_new_tokens": max_new_tokens, "temperature": temperature, "repeats": repeats,
      "top_p": top_p, "top_k": top_k, "prompts": len(prompts), "categories": cats,
      "warm_prompts": len(warm_prompts),
      "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "host": platform.node(), "weights_in_huge_pages": bool(getattr(bundle, "huge_pages", False)),
      "summary": summary, "forward_time_curve_s": {str(k): v for k, v in curve.items()},
      "runs": {label: res["runs"] for label, res in results.items()},
  }
  print(format_table(report))
  if out:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
  if plot:
    plot_report(report, plot)
    print(f"wrote {plot}")
  return report


def format_table(report: dict) -> str:
  cats = report["categories"]
  lines = [f"model {report['model']} ({report['dtype']}, {report['backend']}), {report['prompts']} prompts, "
           f"{report['max_new_tokens']} new tokens, temperature {report['temperature']}"]
  if report.get("machine"):
    lines.append("machine: " + describe(report["machine"]))
  head = (f"{'method':<28}{'MAT':>6}{'T/fwd':>6}{'tok/s':>8}{'speedup':>9}{'med':>6}{'min':>6}{'compile':>9}"
          "  same-as-AR  ") + \
         "  ".join(f"{c[:10]:>10}" for c in cats)
  lines += [head, "-" * len(head)]
  for label, s in report["summary"].items():
    o = s["overall"]
    cat_cells = "  ".join(f"{s['categories'][c]['mat']:>4.2f}/{s['categories'][c].get('speedup', 1):>4.2f}"
                          for c in cats)
    lines.append(f"{label:<28}{o['mat']:>6.2f}{o.get('mean_forward_tokens', 0):>6.2f}{o['tokens_per_s']:>8.1f}{o.get('speedup', 1.0):>9.2f}"
                 f"{o.get('speedup_median', 1.0):>6.2f}{o.get('speedup_min', 1.0):>6.2f}{s['compile_s']:>8.1f}s"
                 f"  {s['identical_to_ar']:>10}  "
                 f"{cat_cells}")
  lines.append("(per category: MAT/speedup; T/fwd = tokens in each decode forward; speedup = tokens/s over AR in "
               "this run; med/min = median/lowest per-prompt ratio)")
  for label, s in report["summary"].items():
    rates = s["overall"]["accept_rates"]
    if rates:
      lines.append(f"  {label} acceptance by draft position: " + " ".join(f"{r:.2f}" for r in rates[:8]))
  curve = report.get("forward_time_curve_s")
  if curve:
    one = curve.get("1")
    lines.append("forward time vs tokens: " + ", ".join(
        f"T={k}: {v * 1e3:.1f}ms" + (f" ({v / one:.2f}x)" if one and k != "1" else "") for k, v in curve.items()))
  return "\n".join(lines)


def require_matplotlib() -> None:
  """Raise a one-line error with the install command when the optional plot dependency is missing."""
  try:
    import matplotlib  # noqa: F401
  except ImportError as e:
    raise InvalidOptionError("--plot needs matplotlib: pip install 'jaxspec[bench]' (or pip install matplotlib), "
                             "or drop --plot") from e


def plot_report(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cats = report["categories"] + ["overall"]
  labels = list(report["summary"])
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  width = 0.8 / max(len(labels), 1)
  for i, label in enumerate(labels):
    s = report["summary"][label]
    speed = [s["categories"][c].get("speedup", 1.0) for c in report["categories"]] + [s["overall"].get("speedup", 1.0)]
    mat = [s["categories"][c]["mat"] for c in report["categories"]] + [s["overall"]["mat"]]
    x = np.arange(len(cats)) + i * width
    axes[0].bar(x, speed, width, label=label)
    axes[1].bar(x, mat, width, label=label)
  for ax, title in zip(axes, ("speedup over AR (tokens/s)", "mean accepted tokens per forward (MAT)")):
    ax.set_xticks(np.arange(len(cats)) + 0.4 - width / 2)
    ax.set_xticklabels(cats, rotation=30, ha="right")
    ax.set_title(title)
    ax.axhline(1.0, color="gray", lw=0.8)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{report['model']} {report['dtype']} {report['backend']}, T={report['temperature']}")
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def add_bench_parser(sub) -> None:
  p = sub.add_parser("bench", help="benchmark decoding methods against AR on a prompt file")
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--methods", default="ar pld recycling",
                 help="methods separated by spaces, ';' or ',', each name[:key=value,...], "
                      "e.g. 'ar pld:k=3 recycling:template=small,k=8'")
  p.add_argument("--prompts", required=True, help="Spec-Bench JSONL (question_id, category, turns)")
  p.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
  p.add_argument("--per-category", type=int, default=2)
  p.add_argument("--warm-per-category", type=int, default=0,
                 help="untimed runs on this many other prompts per category first (learned state warms up)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default=None)
  p.add_argument("--repeats", type=int, default=1,
                 help="runs per prompt and method; each prompt's time is their median (noisy machines)")
  p.add_argument("--forward-curve", default=",".join(map(str, FORWARD_CURVE)),
                 help="token counts to time one forward at (recorded with the results; '' to skip)")
  p.add_argument("--out", default=None, help="JSON result path")
  p.add_argument("--plot", default=None, help="PNG path for the speedup/MAT plot")
  p.set_defaults(func=_bench_cmd)


def _bench_cmd(args) -> int:
  methods = parse_method_list(args.methods)
  for name, opts, _ in methods:  # fail on a bad method before loading the model
    get_method(name, **opts)
  if args.plot:
    require_matplotlib()
  cats = args.categories.split(",") if args.categories else None
  curve = [int(x) for x in args.forward_curve.split(",") if x]
  run_bench(args.model, methods, args.prompts, cats, args.per_category, args.max_new_tokens, args.temperature,
            args.top_p, args.top_k, args.seed, args.dtype, curve, args.out, args.plot,
            warm_per_category=args.warm_per_category, repeats=args.repeats)
  return 0
