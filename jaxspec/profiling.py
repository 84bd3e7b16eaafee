"""Device forward time as a function of the number of tokens in one forward."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.models.kv_cache import init_cache

CURVE_KEY = "forward_time_curve"


def forward_time_curve(bundle, sizes, context: int = 128, repeats: int = 5) -> dict[int, float]:
  """Median seconds of one decode forward of T tokens (tree mask = causal) after `context`
  committed tokens, for each T in sizes. Cached in bundle.method_memory (per bundle, per device)."""
  cached = bundle.method_memory.setdefault(CURVE_KEY, {})
  todo = [int(t) for t in sizes if int(t) not in cached]
  graphdef = bundle.graphdef

  @jax.jit
  def fwd(params, cache, tokens_BxT, mask_TxT):
    model = nnx.merge(graphdef, params)
    T = tokens_BxT.shape[1]
    pos = cache.lengths[:, None] + jnp.arange(T)[None]
    return model(cache, tokens_BxT, pos, mask_TxT)[0]

  slots = context + max(todo, default=1) + 1
  slots = -(-slots // 128) * 128
  for T in todo:
    cache = init_cache(bundle.config, 1, slots, bundle.dtype).replace(lengths=jnp.asarray([context], jnp.int32))
    toks = jnp.ones((1, T), jnp.int32)
    mask = jnp.tril(jnp.ones((T, T), bool))
    jax.block_until_ready(fwd(bundle.params, cache, toks, mask))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fwd(bundle.params, cache, toks, mask))
      times.append(time.perf_counter() - t0)
    cached[T] = float(np.median(times))
  return {int(t): cached[int(t)] for t in sizes}
