"""Forward time and AR speed with the weights in XLA's own buffers vs one huge-page block
(jaxspec.models.host_arena), in the same process, in interleaved rounds.

Why: on 2026-12-07 the 2-vCPU Xeon VM ran the same 1-token forward 3-6x slower than the day
before (200 vs 32 ms) while numpy's large matmuls ran at full speed; 90 separate 3.5 MB matvecs
were 10x slower than the same bytes in one (huge-page) array. Page walks, not arithmetic.

    python experiments/host_arena.py [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "host_arena.json"


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--sizes", default="1,2,4,8,16")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=5, help="forwards per size per round")
  ap.add_argument("--tokens", type=int, default=64, help="AR tokens per generation")
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import jaxspec
  from jaxspec.machine import describe, machine_info
  from jaxspec.models.kv_cache import init_cache

  bundles = {"xla_buffers": jaxspec.load_model(args.model, progress=False, huge_pages=False),
             "huge_page_block": jaxspec.load_model(args.model, progress=False, huge_pages=True)}
  graphdef = bundles["xla_buffers"].graphdef
  sizes = [int(s) for s in args.sizes.split(",")]

  @jax.jit
  def fwd(params, cache, tokens_BxT, mask_TxT):
    T = tokens_BxT.shape[1]
    pos = cache.lengths[:, None] + jnp.arange(T)[None]
    return nnx.merge(graphdef, params)(cache, tokens_BxT, pos, mask_TxT)[0]

  b0 = bundles["xla_buffers"]
  cache = init_cache(b0.config, 1, 256, b0.dtype).replace(lengths=jnp.asarray([128], jnp.int32))
  inputs = {T: (jnp.ones((1, T), jnp.int32), jnp.tril(jnp.ones((T, T), bool))) for T in sizes}
  for b in bundles.values():
    for T in sizes:
      jax.block_until_ready(fwd(b.params, cache, *inputs[T]))
  times = {name: {T: [] for T in sizes} for name in bundles}
  prompt = "Explain why the sky is blue in three sentences."
  ar = {name: [] for name in bundles}
  for b in bundles.values():  # compile the AR loop once per bundle
    jaxspec.generate(b, [prompt], "ar", max_new_tokens=args.tokens)
  for r in range(args.rounds):
    for name, b in bundles.items():
      for T in sizes:
        for _ in range(args.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(fwd(b.params, cache, *inputs[T]))
          times[name][T].append(time.perf_counter() - t0)
      res = jaxspec.generate(b, [prompt], "ar", max_new_tokens=args.tokens)
      ar[name].append(res.stats.tokens_per_s)
    print(f"round {r + 1}: " + "  ".join(
        f"{n} T=1 {np.median(times[n][1]) * 1e3:.1f} ms, AR {ar[n][-1]:.1f} tok/s" for n in bundles), flush=True)

  with open("/proc/meminfo") as f:
    anon_huge = next((line.split(":")[1].strip() for line in f if line.startswith("AnonHugePages")), None)
  report = {"machine": machine_info(), "load_avg_end": list(os.getloadavg()), "anon_huge_pages": anon_huge,
            "context": 128, "rounds": args.rounds, "repeats": args.repeats}
  for name in bundles:
    med = {T: float(np.median(times[name][T])) for T in sizes}
    report[name] = {"forward_ms": {T: round(med[T] * 1e3, 2) for T in sizes},
                    "ratio_to_T1": {T: round(med[T] / med[1], 3) for T in sizes},
                    "ar_tokens_per_s_median": round(float(np.median(ar[name])), 2),
                    "ar_tokens_per_s": [round(x, 2) for x in ar[name]]}
  base, block = report["xla_buffers"], report["huge_page_block"]
  report["speedup"] = {"forward": {T: round(base["forward_ms"][T] / block["forward_ms"][T], 2) for T in sizes},
                       "ar": round(block["ar_tokens_per_s_median"] / base["ar_tokens_per_s_median"], 2)}
  print(describe(report["machine"]), "| THP", report["machine"].get("transparent_hugepage"))
  for name in bundles:
    print(f"{name:16s} forward ms {report[name]['forward_ms']}  ratio {report[name]['ratio_to_T1']}  "
          f"AR {report[name]['ar_tokens_per_s_median']} tok/s")
  print("speedup", report["speedup"])
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
