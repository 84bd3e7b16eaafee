"""Where should hidden-transfer pseudo slots attach? Cost of one decode step per option, on this
device, relative to a 1-token forward (SmolLM2-135M fp32, batch 1, 128 committed tokens):

  per_node:   the verification forward also carries k pseudo slots for every tree node
  main_chain: ... k pseudo slots for each node of the main chain (depth + 1 nodes), fallback else
  second_pass: the verification forward, then k pseudo tokens through blocks t..L-1 only

Writes experiments/results/ht_attachment_cost.json (with the machine).

    python experiments/ht_attachment_cost.py [--nodes 13] [--k 4] [--layers 20,24,26,28]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxspec
from jaxspec.machine import describe, machine_info
from jaxspec.methods.hidden_transfer import init_heads, pseudo_logits
from jaxspec.models.kv_cache import init_cache
from jaxspec.profiling import forward_time_curve

OUT = Path(__file__).resolve().parent / "results" / "ht_attachment_cost.json"


def partial_pass_time(bundle, k: int, layer: int, context: int = 128, repeats: int = 7) -> float:
  graphdef = bundle.graphdef
  heads = init_heads(jax.random.key(0), k, bundle.config.embed_dim)

  @jax.jit
  def run(params, heads, cache, h):
    return pseudo_logits(nnx.merge(graphdef, params), heads, cache, h, layer)

  cache = init_cache(bundle.config, 1, 256, bundle.dtype).replace(lengths=jnp.asarray([context], jnp.int32))
  h = jnp.ones((1, bundle.config.embed_dim), jnp.float32)
  jax.block_until_ready(run(bundle.params, heads, cache, h))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run(bundle.params, heads, cache, h))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--nodes", type=int, default=13, help="tree size with the root")
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--layers", default="20,24,26,28")
  args = ap.parse_args()
  bundle = jaxspec.load_model(args.model, dtype=jnp.float32, progress=False)
  n, k = args.nodes, args.k
  sizes = {"one": 1, "tree": n, "per_node": n + n * k, "main_chain": n + (k + 1) * k}
  fresh = dataclasses.replace(bundle, path=None, method_memory={})  # measured now: no cached curve
  curve = forward_time_curve(fresh, sorted(set(sizes.values())))
  one = curve[1]
  rows = {name: curve[size] / one for name, size in sizes.items()}
  for layer in (int(x) for x in args.layers.split(",")):
    rows[f"second_pass_t{layer}"] = (curve[n] + partial_pass_time(bundle, k, layer)) / one
  result = {"machine": machine_info(), "model": args.model, "nodes": n, "k": k,
            "forward_s": {str(t): s for t, s in curve.items()}, "step_cost_vs_one_token": rows}
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(json.dumps(result, indent=1) + "\n")
  print("machine:", describe(result["machine"]))
  for name, r in rows.items():
    print(f"{name:>20}: {r:.2f}x a 1-token forward")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
