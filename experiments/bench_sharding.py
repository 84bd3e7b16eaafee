"""Decode step time per mesh shape, on simulated CPU devices (a correctness run, not a speed claim).

For each mesh (default 1x8, 2x4, 4x2, 8x1 on 8 simulated devices, plus the single-device
baseline), in one process:
  * load the model straight onto the mesh (each parameter read from the safetensors file shard
    by shard) and record the load time and the parameter bytes that device 0 holds;
  * `jaxspec.generate` a batch of Spec-Bench prompts (first turn, chat template, categories mixed)
    greedily, once to compile and once timed, with `method` (AR by default);
  * report compile time, prefill time, decode step time ((wall - prefill) / steps), tokens/s,
    and whether the token ids equal the single-device run's.

Simulated devices share the host's cores and "communicate" by memcpy, so the step times say
nothing about real TP/DP speed; they show the sharded programs run and what their overhead
is on one CPU. Run from the repo root:

    python experiments/bench_sharding.py                                   # SmolLM2, batch 8, 32 tokens
    python experiments/bench_sharding.py --meshes 2x4 data=8,model=1 --method pld --max-new-tokens 16

Writes a table to stdout and JSON to experiments/results/sharding_cpu8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "spec_bench_dev.jsonl"
DEFAULT_OUT = REPO / "experiments" / "results" / "sharding_cpu8.json"


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description="decode step time per mesh shape on simulated CPU devices")
  ap.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="Spec-Bench style JSONL")
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices (XLA_FLAGS)")
  ap.add_argument("--meshes", nargs="+", default=["1x8", "2x4", "4x2", "8x1"],
                  help="mesh shapes, each as jaxspec.mesh.parse_mesh reads them (2x4 or data=2,model=4)")
  ap.add_argument("--batch", type=int, default=8, help="prompts per call (a multiple of every data axis)")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--method", default="ar")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  return ap.parse_args(argv)


def load_prompts(path: Path, n: int) -> list[str]:
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  by_cat: dict[str, list[str]] = {}
  for r in rows:
    by_cat.setdefault(r["category"], []).append(r["turns"][0])
  out, i = [], 0
  while len(out) < n:
    for cat in sorted(by_cat):
      if i < len(by_cat[cat]) and len(out) < n:
        out.append(by_cat[cat][i])
    i += 1
  return out


def device0_bytes(tree) -> int:
  import jax
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def run_one(args, prompts, mesh, ref_ids=None) -> dict:
  import jax
  import jaxspec
  t0 = time.perf_counter()
  bundle = jaxspec.load_model(args.model, progress=False, mesh=mesh)
  jax.block_until_ready(bundle.params)
  load_s = time.perf_counter() - t0
  kw = dict(method=args.method, max_new_tokens=args.max_new_tokens)
  first = jaxspec.generate(bundle, prompts, **kw)  # compiles
  out = jaxspec.generate(bundle, prompts, **kw)
  s = out.stats
  step_ms = 1e3 * (s.wall_s - s.prefill_s) / max(s.steps, 1)
  return {
      "mesh": "single device" if mesh is None else "x".join(str(v) for v in mesh.shape.values()),
      "load_s": round(load_s, 2), "param_bytes_device0": device0_bytes(bundle.params),
      "compile_s": round(first.stats.compile_s, 2), "prefill_s": round(s.prefill_s, 3),
      "decode_step_ms": round(step_ms, 2), "steps": s.steps, "new_tokens": sum(s.new_tokens),
      "tokens_per_s": round(s.tokens_per_s, 1), "tokens_per_forward": round(s.tokens_per_forward, 3),
      "token_ids": out.token_ids,
      "equal_to_single_device": None if ref_ids is None else out.token_ids == ref_ids,
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  if "jax" not in sys.modules:  # must be set before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
  import jax
  from jaxspec.mesh import make_mesh, parse_mesh
  prompts = load_prompts(args.data, args.batch)
  meshes = [make_mesh(**parse_mesh(m)) for m in args.meshes]  # validate first
  print(f"{args.model}, {args.method}, batch {args.batch}, {args.max_new_tokens} new tokens, "
        f"{jax.device_count()} simulated {jax.default_backend()} devices")
  print(f"{'mesh':>14} {'load s':>7} {'params/dev MB':>13} {'compile s':>9} {'prefill s':>9} "
        f"{'step ms':>8} {'tok/s':>7} {'equal':>6}", flush=True)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  rows, ref = [], None
  for mesh in [None] + meshes:  # the JSON is rewritten after every row: a killed run keeps its rows
    r = run_one(args, prompts, mesh, ref)
    ref = ref if ref is not None else r["token_ids"]
    rows.append(r)
    print(f"{r['mesh']:>14} {r['load_s']:>7} {r['param_bytes_device0'] / 2**20:>13.1f} {r['compile_s']:>9} "
          f"{r['prefill_s']:>9} {r['decode_step_ms']:>8} {r['tokens_per_s']:>7} "
          f"{'-' if r['equal_to_single_device'] is None else r['equal_to_single_device']!s:>6}", flush=True)
    result = {
        "what": "decode step time per mesh shape on simulated CPU devices (correctness, not speed)",
        "model": args.model, "method": args.method, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        "devices": jax.device_count(), "backend": jax.default_backend(), "jax": jax.__version__,
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), "machine": platform.machine(),
        "rows": [{k: v for k, v in r.items() if k != "token_ids"} for r in rows],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {args.out}")
  return 0 if all(r["equal_to_single_device"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
