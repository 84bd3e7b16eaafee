"""jaxspec AR decoding vs Hugging Face transformers+torch on CPU, against the memory-bandwidth bound.

In one process, for N Spec-Bench prompts (first turn, categories mixed round-robin, chat template
applied, the same token ids fed to every engine), greedy, fp32, `--threads` CPU threads:

  jaxspec   `jaxspec.generate(bundle, [ids], max_new_tokens=M)`, one prompt at a time. The first
            call is the warm-up and is reported as a fresh process's first call: compile time,
            prefill time and time to first token including compilation (compile + prefill: both
            executables are compiled before any token can come out, `stream` included).
            Timed calls use `stats.wall_s` (prefill + decode, compilation excluded; compiles
            caused by a new prompt-length bucket are reported per prompt).
  hf        `model.generate(do_sample=False, max_new_tokens=M)`, wall clock, after a warm-up.
  hf_pld    the same with `prompt_lookup_num_tokens=10` (transformers' prompt lookup decoding).
  --jax-methods SPECS   extra jaxspec methods on the same prompts (e.g. 'pld', or
            'draft:drafter=qwen2.5-coder-0.5b-instruct,k=4' with --model qwen2.5-coder-1.5b-instruct)
  --assistant NAME      HF assisted generation (`assistant_model=`) with that draft model

The engines run interleaved per prompt (jaxspec, hf, hf_pld for prompt 1, then prompt 2, ...)
so that load from other processes on a shared machine hits all of them alike; `--repeats R`
keeps the fastest of R runs per prompt and engine. torch's OpenMP threads slow down far more
than XLA's when other processes share the cores (measured here: HF went from ~19 to ~1.5 tok/s
at load average 4 on 2 cores), so check the load averages recorded in the JSON before
trusting a ratio.

Reported: per-prompt and median tokens/s (new tokens / (prefill + decode) wall time, EOS counted
as a token when produced, for every engine alike), decode-only tokens/s (prefill time removed;
for HF the prefill time is a separate max_new_tokens=1 call), jaxspec/HF ratio, achieved weight
bandwidth = model bytes x decode tokens/s, the machine's memory read bandwidth measured in the
same run, and the fraction of the bound that reaches. Greedy outputs are compared token by token
(jaxspec vs HF, and HF prompt lookup vs HF, which is lossless and must match too).

Run from the repo root (torch is needed only by this script and the goldens):

    pip install torch==2.13.0
    python experiments/bench_ar_vs_hf.py                                  # 10 prompts x 128 tokens (~10 min)
    python experiments/bench_ar_vs_hf.py --num-prompts 3 --max-new-tokens 32   # quick check
    python experiments/bench_ar_vs_hf.py --jax-methods pld --out experiments/results/pld_vs_hf.json
    python experiments/bench_ar_vs_hf.py --model qwen2.5-coder-1.5b-instruct --num-prompts 4 \
        --max-new-tokens 64 --assistant qwen2.5-coder-0.5b-instruct --prompt-lookup-tokens 0 \
        --jax-methods 'draft:drafter=qwen2.5-coder-0.5b-instruct,k=4' --out experiments/results/draft_pair_vs_hf.json

Writes a table to stdout and JSON to experiments/results/ar_vs_hf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

T_PROCESS_START = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "spec_bench_dev.jsonl"
DEFAULT_OUT = REPO / "experiments" / "results" / "ar_vs_hf.json"
TORCH_PIN = "torch==2.13.0"


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description="jaxspec AR vs transformers+torch greedy decoding on CPU")
  ap.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA,
                  help="Spec-Bench style JSONL (question_id, category, turns); default: %(default)s")
  ap.add_argument("--model", default="smollm2-135m-instruct", help="registered name or HF folder")
  ap.add_argument("--num-prompts", type=int, default=10)
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch) / cores the process is pinned to")
  ap.add_argument("--prompt-lookup-tokens", type=int, default=10, help="0 skips the HF prompt lookup run")
  ap.add_argument("--jax-methods", default="",
                  help="extra jaxspec methods run on the same prompts, ';'-separated specs as in jaxspec bench, "
                       "e.g. 'pld;draft:drafter=qwen2.5-coder-0.5b-instruct,k=4'")
  ap.add_argument("--assistant", default="",
                  help="also run HF assisted generation with this draft model (registered name or HF folder)")
  ap.add_argument("--repeats", type=int, default=1,
                  help="runs per prompt and engine, fastest kept (use >1 on a machine shared with other work)")
  ap.add_argument("--settle-s", type=float, default=0.5,
                  help="pause between engines so one's spinning worker threads do not slow the next")
  ap.add_argument("--bw-gib", type=float, default=1.0, help="array size for the bandwidth probe")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  return ap.parse_args(argv)


def pin_cpus(n: int) -> list[int]:
  """Restrict the process (XLA's and torch's thread pools alike) to n cores, when there are more."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) > n:
    os.sched_setaffinity(0, cpus[:n])
  return sorted(os.sched_getaffinity(0))


def load_prompts(path: Path, n: int) -> list[dict]:
  """First turn of each record, categories interleaved round-robin in order of first appearance."""
  by_cat: OrderedDict[str, list[dict]] = OrderedDict()
  with open(path) as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        by_cat.setdefault(rec["category"], []).append(rec)
  out, i = [], 0
  while len(out) < n and any(i < len(v) for v in by_cat.values()):
    for recs in by_cat.values():
      if i < len(recs) and len(out) < n:
        r = recs[i]
        out.append({"question_id": r["question_id"], "category": r["category"], "text": r["turns"][0]})
    i += 1
  return out


def memory_bandwidth(gib: float, threads: int, repeats: int = 5, model_bytes: int = 0) -> dict:
  """Best-of-`repeats` read bandwidth (GB/s, 1e9 B) over a `gib` GiB fp32 array: numpy sum on 1 and
  `threads` threads, and BLAS matrix-vector (the decode access pattern). Copy is reported
  as read+write bytes for reference. `read_gbps` is the best read-only figure over the big array.
  With `model_bytes`, also matrix-vector over a weight-sized array (not used for the bound)."""
  import numpy as np

  # Random contents: constant arrays read faster here (28 vs 34 GB/s for the same gemv; pages of
  # identical contents may be merged by the host), which would inflate the bound.
  a = np.random.default_rng(0).random(int(gib * (1 << 30)) // 4, dtype=np.float32)
  a_RxC = a.reshape(-1, 4096)
  x_C = np.ones(4096, np.float32)

  def best(fn):
    t = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      t = min(t, time.perf_counter() - t0)
    return t

  def threaded_sum():
    parts = np.array_split(a, threads)
    ts = [threading.Thread(target=p.sum) for p in parts]  # reductions release the GIL
    for t in ts:
      t.start()
    for t in ts:
      t.join()

  gb = a.nbytes / 1e9
  res = {"array_gb": gb,
         "sum_1t_gbps": gb / best(a.sum),
         f"sum_{threads}t_gbps": gb / best(threaded_sum),
         "gemv_gbps": gb / best(lambda: a_RxC @ x_C)}
  b = np.empty_like(a)
  res["copy_rw_gbps"] = 2 * gb / best(lambda: np.copyto(b, a))
  res["read_gbps"] = max(v for k, v in res.items() if k.endswith("gbps") and not k.startswith("copy"))
  del a_RxC, a, b
  if model_bytes:  # informational: a weight-sized stream may partly hit a large L3 between passes
    m_RxC = np.random.default_rng(1).random((model_bytes // 4 // 4096, 4096), dtype=np.float32)
    res["gemv_model_size_gbps"] = m_RxC.nbytes / 1e9 / best(lambda: m_RxC @ x_C)
  return res


def write_json(path: Path, doc: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(doc, indent=1) + "\n")
  tmp.replace(path)


def first_divergence(a: list[int], b: list[int]) -> int | None:
  """Index of the first differing token (a length difference counts at the shorter length)."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def median(xs):
  xs = [x for x in xs if x == x]
  return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import torch
  except ImportError:
    print(f"this benchmark compares against transformers+torch; install the pinned CPU wheel:\n"
          f"  pip install {TORCH_PIN}", file=sys.stderr)
    return 1
  cpus = pin_cpus(args.threads)
  torch.set_num_threads(args.threads)
  import jax
  import transformers
  from transformers import AutoModelForCausalLM

  import jaxspec
  from jaxspec.models.pull import resolve_model_path

  load_avg_start = os.getloadavg()
  if load_avg_start[0] > len(cpus):
    print(f"WARNING: load average {load_avg_start[0]:.1f} on {len(cpus)} cores: other work is running and "
          "the timings will be noisy (torch's OpenMP threads suffer most); consider --repeats 3", file=sys.stderr)
  prompts = load_prompts(args.data, args.num_prompts)
  if len(prompts) < args.num_prompts:
    print(f"only {len(prompts)} prompts in {args.data}", file=sys.stderr)

  bw_start = memory_bandwidth(args.bw_gib, args.threads)
  print(f"memory read bandwidth (start): {bw_start['read_gbps']:.1f} GB/s "
        f"(sum 1t {bw_start['sum_1t_gbps']:.1f}, gemv {bw_start['gemv_gbps']:.1f}, "
        f"copy r+w {bw_start['copy_rw_gbps']:.1f})", flush=True)

  t0 = time.perf_counter()
  bundle = jaxspec.load(args.model, dtype="float32", progress=False)
  jax_load_s = time.perf_counter() - t0
  folder = Path(resolve_model_path(args.model, progress=False))
  tok = bundle.tokenizer
  hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
  assistant = None
  if args.assistant:
    assistant = AutoModelForCausalLM.from_pretrained(str(resolve_model_path(args.assistant, progress=False)),
                                                     dtype=torch.float32).eval()
  from jaxspec.methods import parse_method_spec
  jax_methods = [parse_method_spec(m) for m in args.jax_methods.split(";") if m.strip()]
  eos_ids = set(bundle.eos_ids)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids)

  for p in prompts:
    rendered = tok.apply_chat_template([{"role": "user", "content": p["text"]}], add_generation_prompt=True,
                                       tokenize=False)
    p["ids"] = list(tok.encode(rendered, add_special_tokens=False))

  jax_bytes = bundle.param_bytes
  hf_bytes = sum(t.numel() * t.element_size() for t in hf.parameters())  # tied weights counted once
  M = args.max_new_tokens

  def run_jax(ids, method="ar", **options):
    r = jaxspec.generate(bundle, [ids], method=method, max_new_tokens=M, method_options=options or None)
    s = r.stats
    toks = list(r.token_ids[0])
    n = s.new_tokens[0]
    if n > len(toks):  # generate drops the EOS from token_ids; put it back for comparison
      toks.append(min(eos_ids))
    return {"new_tokens": n, "wall_s": s.wall_s, "prefill_s": s.prefill_s, "compile_s": s.compile_s,
            "tok_s": n / s.wall_s, "decode_tok_s": (n - 1) / (s.wall_s - s.prefill_s) if n > 1 else float("nan"),
            "mat": s.tokens_per_forward, "ids": toks}

  def hf_generate(ids, max_new, **kw):
    x = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
      t = time.perf_counter()
      out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                        pad_token_id=pad_id, **kw)
      wall = time.perf_counter() - t
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):
      if t in eos_ids:
        new = new[: i + 1]
        break
    return new, wall

  def run_hf(ids, prefill_s, **kw):
    new, wall = hf_generate(ids, M, **kw)
    n = len(new)
    return {"new_tokens": n, "wall_s": wall, "prefill_s": prefill_s, "tok_s": n / wall,
            "decode_tok_s": (n - 1) / (wall - prefill_s) if n > 1 else float("nan"), "ids": new}

  def meta():
    return {
        "benchmark": "ar_vs_hf", "model": args.model, "model_folder": str(folder),
        "data": str(args.data), "num_prompts": len(prompts), "max_new_tokens": M, "threads": args.threads,
        "cpus": cpus, "dtype": "float32", "repeats": args.repeats,
        "param_bytes": jax_bytes, "hf_param_bytes": hf_bytes,
        "versions": {"jax": jax.__version__, "jaxspec": getattr(jaxspec, "__version__", "0.1.0"),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "platform": platform.platform(), "processor": platform.processor(), "os_cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_backend": jax.default_backend(),
        "load_avg_start": load_avg_start, "load_avg_now": os.getloadavg(),
    }

  # Fresh process: the first jaxspec call compiles; it doubles as the warm-up.
  t0 = time.perf_counter()
  first = run_jax(prompts[0]["ids"])
  first_call_s = time.perf_counter() - t0
  jax_first = {"compile_s": first["compile_s"], "prefill_s": first["prefill_s"],
               "ttft_incl_compile_s": first["compile_s"] + first["prefill_s"],
               "first_call_wall_s": first_call_s, "model_load_s": jax_load_s,
               "process_start_to_first_result_s": time.perf_counter() - T_PROCESS_START}
  print(f"jaxspec first call: compile {jax_first['compile_s']:.2f}s, prefill {first['prefill_s']*1e3:.0f} ms, "
        f"TTFT incl. compile {jax_first['ttft_incl_compile_s']:.2f}s, whole call {first_call_s:.2f}s", flush=True)
  hf_generate(prompts[0]["ids"], M)  # warm-ups
  if args.prompt_lookup_tokens:
    hf_generate(prompts[0]["ids"], M, prompt_lookup_num_tokens=args.prompt_lookup_tokens)
  if assistant is not None:
    hf_generate(prompts[0]["ids"], M, assistant_model=assistant)
  for name, opts, label in jax_methods:  # compile each method before timing
    jax_first[f"compile_s:{label}"] = run_jax(prompts[0]["ids"], name, **opts)["compile_s"]

  def fastest(fn, *a, **kw):
    best, all_tok_s = None, []
    for _ in range(max(args.repeats, 1)):
      time.sleep(args.settle_s)
      r = fn(*a, **kw)
      if best is not None and r["ids"] != best["ids"]:
        raise RuntimeError("greedy decoding gave different tokens on a repeat")
      all_tok_s.append(r["tok_s"])
      best = r if best is None or r["wall_s"] < best["wall_s"] else best
    best["all_tok_s"] = all_tok_s
    return best

  rows = []
  for i, p in enumerate(prompts):
    ids = p["ids"]
    j = fastest(run_jax, ids)
    time.sleep(args.settle_s)
    hf_prefill = min(hf_generate(ids, 1)[1] for _ in range(2))
    h = fastest(run_hf, ids, hf_prefill)
    pl = (fastest(run_hf, ids, hf_prefill, prompt_lookup_num_tokens=args.prompt_lookup_tokens)
          if args.prompt_lookup_tokens else None)
    row = {"question_id": p["question_id"], "category": p["category"], "prompt_tokens": len(ids),
           "jaxspec": j, "hf": h, "hf_pld": pl,
           "jax_vs_hf_first_divergence": first_divergence(j["ids"], h["ids"]),
           "pld_vs_hf_first_divergence": first_divergence(pl["ids"], h["ids"]) if pl else None}
    if assistant is not None:
      row["hf_assisted"] = fastest(run_hf, ids, hf_prefill, assistant_model=assistant)
    for name, opts, label in jax_methods:
      row[f"jaxspec:{label}"] = fastest(run_jax, ids, name, **opts)
    row["divergence_vs_hf"] = {e: first_divergence(row[e]["ids"], h["ids"]) for e in row
                               if isinstance(row[e], dict) and "ids" in row[e]}
    rows.append(row)
    write_json(args.out, {**meta(), "partial": True, "memory_bandwidth": {"start": bw_start},
                          "jaxspec_first_call": jax_first, "prompts": rows})  # survives a killed run
    print(f"[{i + 1}/{len(prompts)}] {p['category']:15s} P={len(ids):4d}  jaxspec {j['tok_s']:6.1f} tok/s  "
          f"hf {h['tok_s']:6.1f}" + (f"  hf_pld {pl['tok_s']:6.1f}" if pl else "")
          + "".join(f"  {e} {row[e]['tok_s']:6.1f}" for e in row if e.startswith(("jaxspec:", "hf_assisted")))
          + "".join(f"  MISMATCH {e} at {d}" for e, d in row["divergence_vs_hf"].items() if d is not None), flush=True)

  bw_end = memory_bandwidth(args.bw_gib, args.threads, model_bytes=jax_bytes)
  if os.getloadavg()[0] > len(cpus):
    print(f"WARNING: load average {os.getloadavg()[0]:.1f} on {len(cpus)} cores at the end of the run", file=sys.stderr)
  read_gbps = max(bw_start["read_gbps"], bw_end["read_gbps"])
  engines = (["jaxspec"] + [f"jaxspec:{label}" for _, _, label in jax_methods] + ["hf"]
             + (["hf_pld"] if args.prompt_lookup_tokens else []) + (["hf_assisted"] if assistant is not None else []))
  summary = {}
  for e in engines:
    tok_s = median([r[e]["tok_s"] for r in rows])
    dec = median([r[e]["decode_tok_s"] for r in rows])
    summary[e] = {"median_tok_s": tok_s, "median_decode_tok_s": dec,
                  "median_prefill_ms": 1e3 * median([r[e]["prefill_s"] for r in rows]),
                  "weight_gbps": jax_bytes * tok_s / 1e9, "decode_weight_gbps": jax_bytes * dec / 1e9,
                  "fraction_of_bound": jax_bytes * tok_s / 1e9 / read_gbps,
                  "decode_fraction_of_bound": jax_bytes * dec / 1e9 / read_gbps}
  ratio = summary["jaxspec"]["median_tok_s"] / summary["hf"]["median_tok_s"]
  ratio_per_prompt = median([r["jaxspec"]["tok_s"] / r["hf"]["tok_s"] for r in rows])
  mismatches = [{"question_id": r["question_id"], "engine": e, "first_divergence": d}
                for r in rows for e, d in r["divergence_vs_hf"].items() if d is not None]
  for e in engines:
    if e.startswith("jaxspec:"):
      summary[e]["median_mat"] = median([r[e]["mat"] for r in rows])

  # ---- table
  print()
  print(f"model {args.model}: {jax_bytes / 1e6:.1f} MB of fp32 weights (HF counts {hf_bytes / 1e6:.1f} MB); "
        f"{len(rows)} prompts x {M} new tokens, greedy, {args.threads} threads (cpus {cpus})")
  print(f"memory read bandwidth {read_gbps:.1f} GB/s -> weight-stream bound {read_gbps * 1e9 / jax_bytes:.1f} tok/s")
  print(f"(matrix-vector over a weight-sized array: {bw_end['gemv_model_size_gbps']:.1f} GB/s; "
        f"{len(rows)} prompts, load average {load_avg_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
  hdr = f"{'qid':>5s} {'category':15s} {'P':>4s} {'new':>4s} " + " ".join(f"{e + ' tok/s':>14s}" for e in engines)
  print(hdr)
  for r in rows:
    print(f"{r['question_id']:>5} {r['category'][:15]:15s} {r['prompt_tokens']:4d} {r['jaxspec']['new_tokens']:4d} "
          + " ".join(f"{r[e]['tok_s']:14.1f}" for e in engines))
  print("-" * len(hdr))
  print(f"{'engine':24s} {'tok/s':>7s} {'decode tok/s':>13s} {'prefill ms':>11s} {'weight GB/s':>12s} {'of bound':>9s}")
  for e in engines:
    s = summary[e]
    print(f"{e[:24]:24s} {s['median_tok_s']:7.1f} {s['median_decode_tok_s']:13.1f} {s['median_prefill_ms']:11.1f} "
          f"{s['weight_gbps']:12.2f} {s['fraction_of_bound']:9.1%}")
  if any(summary[e]["fraction_of_bound"] > 1 for e in engines):
    print("note: above 100% means the probe under-read the bandwidth (other work on the machine) or part of "
          "the weights stay in the last-level cache between decode steps")
  print(f"jaxspec/HF (ratio of medians) {ratio:.2f}x; median per-prompt ratio {ratio_per_prompt:.2f}x")
  if args.prompt_lookup_tokens:
    print(f"jaxspec/HF prompt lookup {summary['jaxspec']['median_tok_s'] / summary['hf_pld']['median_tok_s']:.2f}x")
  print(f"jaxspec fresh process: compile {jax_first['compile_s']:.2f}s, "
        f"TTFT incl. compile {jax_first['ttft_incl_compile_s']:.2f}s")
  for e in engines:
    if e.startswith("jaxspec:"):
      for ref in ("jaxspec", "hf", "hf_pld", "hf_assisted"):
        if ref in summary:
          print(f"{e} / {ref}: {summary[e]['median_tok_s'] / summary[ref]['median_tok_s']:.2f}x"
                + (f" (MAT {summary[e]['median_mat']:.2f})" if ref == "jaxspec" else ""))
  if "hf_assisted" in summary:
    print(f"HF assisted / HF: {summary['hf_assisted']['median_tok_s'] / summary['hf']['median_tok_s']:.2f}x")
  if mismatches:
    for m in mismatches:
      print(f"GREEDY MISMATCH vs HF: {m['engine']} question {m['question_id']} first diverges at token {m['first_divergence']}")
  else:
    print("greedy token ids: every engine == HF greedy on every prompt")

  doc = {
      **meta(), "partial": False,
      "load_avg_end": os.getloadavg(),
      "memory_bandwidth": {"start": bw_start, "end": bw_end, "read_gbps": read_gbps},
      "weight_bound_tok_s": read_gbps * 1e9 / jax_bytes,
      "jaxspec_first_call": jax_first, "summary": summary,
      "jaxspec_over_hf": ratio, "jaxspec_over_hf_per_prompt_median": ratio_per_prompt,
      "jaxspec_over_hf_pld": (summary["jaxspec"]["median_tok_s"] / summary["hf_pld"]["median_tok_s"]
                              if args.prompt_lookup_tokens else None),
      "greedy_mismatches": mismatches,
      "prompts": rows,
  }
  write_json(args.out, doc)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
