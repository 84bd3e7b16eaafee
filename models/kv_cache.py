"""Static-shape KV cache with per-row committed lengths and scratch slots.

Layout per layer: k, v [B, K, S, D] (batch, kv heads, slots, head dim): kv heads and slots
are the axes a TPU kernel blocks over. Slots [0, lengths[b]) hold row b's committed prefix;
a forward writes its T new tokens to slots [lengths[b], lengths[b] + T) (the scratch region)
without advancing `lengths`; `commit` keeps an accepted subset of the scratch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models.config import ModelConfig

# Logical axis names of cache arrays, for jaxspec.sharding.
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


@struct.dataclass
class KVCache:
  """Fields carry their logical axes (`metadata["axes"]`, every array of a tuple alike)."""

  k: tuple[jax.Array, ...] = struct.field(metadata={"axes": CACHE_AXES})  # L x [B, K, S, D]
  v: tuple[jax.Array, ...] = struct.field(metadata={"axes": CACHE_AXES})  # L x [B, K, S, D]
  lengths: jax.Array = struct.field(metadata={"axes": ("batch",)})  # [B] int32, committed slots per row

  @property
  def num_slots(self) -> int:
    return self.k[0].shape[2]

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0]


def init_cache(config: ModelConfig, batch_size: int, num_slots: int, dtype=jnp.float32) -> KVCache:
  """An empty cache (all lengths 0) of `num_slots` slots per row."""
  shape = (batch_size, config.num_kv_heads, num_slots, config.head_dim)
  zeros = lambda: jnp.zeros(shape, dtype)
  return KVCache(
      k=tuple(zeros() for _ in range(config.num_layers)),
      v=tuple(zeros() for _ in range(config.num_layers)),
      lengths=jnp.zeros((batch_size,), jnp.int32),
  )


UNROLL_ROWS_UP_TO = 16  # per-row in-place updates below this batch size, one scatter above


def write_scratch(cache_BxKxSxD: jax.Array, new_BxKxTxD: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """Write each row's T new entries at slots [lengths[b], lengths[b] + T).

  Small batches use one dynamic_update_slice per row: XLA does those in place, while a
  batched scatter made it transpose and copy the whole cache every layer (measured on CPU).
  """
  new_BxKxTxD = new_BxKxTxD.astype(cache_BxKxSxD.dtype)
  B = cache_BxKxSxD.shape[0]
  if B > UNROLL_ROWS_UP_TO:
    write_row = lambda c, n, l: jax.lax.dynamic_update_slice(c, n, (0, l, 0))
    return jax.vmap(write_row)(cache_BxKxSxD, new_BxKxTxD, lengths_B)
  zero = jnp.zeros((), jnp.int32)
  for b in range(B):
    start = (jnp.asarray(b, jnp.int32), zero, lengths_B[b].astype(jnp.int32), zero)
    cache_BxKxSxD = jax.lax.dynamic_update_slice(cache_BxKxSxD, new_BxKxTxD[b:b + 1], start)
  return cache_BxKxSxD


def write_new(cache: KVCache, new: KVCache) -> KVCache:
  """Write a forward's new K/V (`new`: T slots per layer, from `write_cache=False`; None for a
  layer it did not run) to each row's scratch slots [lengths[b], lengths[b] + T)."""
  keep = lambda c, n: c if n is None else write_scratch(c, n, cache.lengths)
  return cache.replace(k=tuple(map(keep, cache.k, new.k)), v=tuple(map(keep, cache.v, new.v)))


def advance(cache: KVCache, n_B: jax.Array) -> KVCache:
  """Commit the first n[b] scratch slots of each row as they are: no data moves (AR, chains)."""
  return cache.replace(lengths=cache.lengths + n_B.astype(jnp.int32))


def commit(cache: KVCache, keep_BxN: jax.Array, n_keep_B: jax.Array) -> KVCache:
  """Keep scratch slots `keep[b, :n_keep[b]]` (indices into the scratch, in path order).

  Moves them to slots [lengths[b], lengths[b] + n_keep[b]) and advances lengths by n_keep.
  Slots past the new length are left as garbage; they are never attended to.
  """
  keep_BxN = keep_BxN.astype(jnp.int32)
  src_BxN = cache.lengths[:, None] + keep_BxN

  def move(c_BxKxSxD):
    kept_BxKxNxD = jnp.take_along_axis(c_BxKxSxD, src_BxN[:, None, :, None], axis=2)
    return write_scratch(c_BxKxSxD, kept_BxKxNxD, cache.lengths)

  return KVCache(
      k=tuple(move(k) for k in cache.k),
      v=tuple(move(v) for v in cache.v),
      lengths=cache.lengths + n_keep_B.astype(jnp.int32),
  )
