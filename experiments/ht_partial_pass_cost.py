"""What the hidden-transfer partial pass costs, relative to a 1-token forward (one process).

The pass runs pseudo states through blocks t..L-1 and the LM head. Variants: pseudo states for
all k offsets or only the first (with `recycle`, heads draft depth 1 only), and the whole
vocabulary or the heads' draft vocabulary (its first N tokens, most frequent first). Medians of
40 calls x 3 rounds, interleaved; 200-token committed context in a 512-slot cache.

    python experiments/ht_partial_pass_cost.py
"""

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxspec
from jaxspec.machine import machine_info
from jaxspec.methods.hidden_transfer import HiddenTransfer, pseudo_logits
from jaxspec.models.kv_cache import init_cache

OUT = Path(__file__).resolve().parent / "results" / "ht_partial_pass_cost_s12.json"


def median_ms(f, *args, n=40):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def main():
  b = jaxspec.load_model("smollm2-135m-instruct", dtype=jnp.float32, progress=False)
  cache = init_cache(b.config, 1, 512, jnp.float32)
  rand = lambda i, x: jax.random.normal(jax.random.key(i), x.shape) * 0.1
  cache = cache.replace(lengths=jnp.full((1,), 200, jnp.int32), k=tuple(rand(i, x) for i, x in enumerate(cache.k)),
                        v=tuple(rand(99 + i, x) for i, x in enumerate(cache.v)))
  ht = HiddenTransfer().resolve(b)
  heads = ht.load_params(b)
  full = {n: v for n, v in heads.items() if n not in ("vocab_N", "head_ExN")}
  model = lambda params: nnx.merge(b.graphdef, params)

  @jax.jit
  def forward1(params, cache, tok):
    return model(params)(cache, tok, cache.lengths[:, None], None, write_cache=False)[0]

  variants = {}
  for N in (None, 16384, 8192, 4096):
    hp = full if N is None else dict(full, head_ExN=heads["head_ExN"][:, :N])
    for off in (1, ht.k):
      fn = jax.jit(lambda params, hp, cache, h, pend, off=off: pseudo_logits(model(params), hp, cache, h, ht.layer,
                                                                             pending_B=pend, offsets=off))
      variants[f"vocab={N or 'all'} offsets={off}"] = (fn, hp)
  h = jax.random.normal(jax.random.key(1), (1, b.config.embed_dim))
  pend = jnp.array([5], jnp.int32)
  ms = {}
  for _ in range(3):
    ms.setdefault("forward T=1", []).append(median_ms(forward1, b.params, cache, pend[:, None]))
    for name, (fn, hp) in variants.items():
      ms.setdefault(name, []).append(median_ms(fn, b.params, hp, cache, h, pend))
  base = float(np.median(ms["forward T=1"]))
  result = {"machine": machine_info(), "load_avg": os.getloadavg(), "layer": ht.layer, "k": ht.k,
            "ms": {n: float(np.median(v)) for n, v in ms.items()},
            "relative_to_forward": {n: float(np.median(v)) / base for n, v in ms.items()}}
  for n, r in result["relative_to_forward"].items():
    print(f"{n:28s} {result['ms'][n]:7.2f} ms  {r:.3f}x")
  OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
