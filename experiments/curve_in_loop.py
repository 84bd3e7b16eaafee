"""Forward time per T measured two ways in one process, beside the AR loop's own step time:
one dispatched forward per timed call (the curve before session 17) vs 8 forwards in one jitted
`fori_loop` (profiling._measure now). Which one is the cost a forward has inside the decode loop?

    python experiments/curve_in_loop.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "curve_in_loop.json"


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--sizes", default="1,2,4,8,16")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--in-loop", type=int, default=8)
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import jaxspec
  from jaxspec.machine import describe, machine_info
  from jaxspec.models.kv_cache import init_cache

  bundle = jaxspec.load_model(args.model, progress=False)
  graphdef, n = bundle.graphdef, args.in_loop
  sizes = [int(s) for s in args.sizes.split(",")]

  def forward(params, cache, tokens_BxT, mask_TxT):
    pos = cache.lengths[:, None] + jnp.arange(tokens_BxT.shape[1])[None]
    return nnx.merge(graphdef, params)(cache, tokens_BxT, pos, mask_TxT)[0]

  per_call = jax.jit(forward)

  @jax.jit
  def in_loop(params, cache, tokens_BxT, mask_TxT):
    def one(_, last):
      return forward(params, cache, tokens_BxT + (last > 1e30).astype(jnp.int32), mask_TxT)[0, -1, 0]
    return jax.lax.fori_loop(0, n, one, jnp.zeros((), jnp.float32))

  cache = init_cache(bundle.config, 1, 256, bundle.dtype).replace(lengths=jnp.asarray([128], jnp.int32))
  inputs = {T: (jnp.ones((1, T), jnp.int32), jnp.tril(jnp.ones((T, T), bool))) for T in sizes}
  for T in sizes:
    jax.block_until_ready(per_call(bundle.params, cache, *inputs[T]))
    jax.block_until_ready(in_loop(bundle.params, cache, *inputs[T]))
  times = {"per_call": {T: [] for T in sizes}, "in_loop": {T: [] for T in sizes}}
  for _ in range(args.rounds):
    for T in sizes:
      t0 = time.perf_counter()
      jax.block_until_ready(per_call(bundle.params, cache, *inputs[T]))
      times["per_call"][T].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(in_loop(bundle.params, cache, *inputs[T]))
      times["in_loop"][T].append((time.perf_counter() - t0) / n)
  prompt = ["Explain why the sky is blue in three sentences."]
  jaxspec.generate(bundle, prompt, "ar", max_new_tokens=64)  # compile
  ar = [1e3 / jaxspec.generate(bundle, prompt, "ar", max_new_tokens=64).stats.tokens_per_s for _ in range(3)]

  report = {"machine": machine_info(), "load_avg_end": list(os.getloadavg()), "context": 128,
            "rounds": args.rounds, "in_loop_forwards": n, "ar_step_ms": round(float(np.median(ar)), 2)}
  for way, d in times.items():
    med = {T: float(np.median(d[T])) for T in sizes}
    report[way] = {"forward_ms": {T: round(med[T] * 1e3, 2) for T in sizes},
                   "ratio_to_T1": {T: round(med[T] / med[1], 3) for T in sizes}}
  print(describe(report["machine"]))
  for way in times:
    print(f"{way:9s} ms {report[way]['forward_ms']}  ratio {report[way]['ratio_to_T1']}")
  print(f"AR loop step {report['ar_step_ms']} ms")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
