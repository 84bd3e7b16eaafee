"""Tree attention in plain XLA: the oracle for the Pallas kernels and the CPU path.

Shapes (single letters used throughout jaxspec.kernels):
  B batch rows, T new (query) tokens, H query heads, K kv heads, G = H // K query heads per
  kv head, S cache slots, D head dim.

Contract: the K/V of the T new tokens are already written into the cache at slots
`lengths[b] + t` (the scratch region after row b's committed prefix). Query t of row b may
attend to
  * every committed slot s < lengths[b], and
  * new token u (slot lengths[b] + u) iff tree_mask[t, u].
Nothing else. A causal chain is the lower-triangular mask; a tree is ancestor-or-self. The mask
is [T, T] for the whole batch or [B, T, T] per row (rows whose drafts differ in shape, training
examples with their own masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def attention_mask(lengths_B: jax.Array, tree_mask_TxT: jax.Array, num_slots: int) -> jax.Array:
  """Boolean [B, T, S]: may query t of row b attend to cache slot s. tree_mask: [T, T] or [B, T, T]."""
  T = tree_mask_TxT.shape[-1]
  B = lengths_B.shape[0]
  slot_S = jnp.arange(num_slots, dtype=jnp.int32)
  rel_BxS = slot_S[None, :] - lengths_B[:, None].astype(jnp.int32)  # slot index in the scratch
  committed_BxS = rel_BxS < 0
  in_scratch_BxS = (rel_BxS >= 0) & (rel_BxS < T)
  tree_BxTxT = jnp.broadcast_to(tree_mask_TxT.astype(bool), (B, T, T))
  # tree_BxTxS[b, t, s] = tree_mask[b, t, rel[b, s]] where rel is inside the scratch region.
  tree_BxTxS = jnp.take_along_axis(
      tree_BxTxT,
      jnp.clip(rel_BxS, 0, T - 1)[:, None, :].repeat(T, axis=1),
      axis=2,
  )
  return committed_BxS[:, None, :] | (in_scratch_BxS[:, None, :] & tree_BxTxS)


def tree_attention_reference(
    q_BxTxHxD: jax.Array,
    k_cache_BxKxSxD: jax.Array,
    v_cache_BxKxSxD: jax.Array,
    lengths_B: jax.Array,
    tree_mask_TxT: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
  """Softmax attention of the new queries over prefix + allowed new tokens; returns [B, T, H, D].

  Accumulates in fp32 whatever the input dtype; output has q's dtype. A query with no
  allowed key (impossible when tree_mask has its diagonal set) returns zeros.
  """
  B, T, H, D = q_BxTxHxD.shape
  K, S = k_cache_BxKxSxD.shape[1], k_cache_BxKxSxD.shape[2]
  if H % K:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
  G = H // K
  scale = D**-0.5 if scale is None else scale
  q_BxKxGxTxD = q_BxTxHxD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
  s_BxKxGxTxS = jnp.einsum(
      "bkgtd,bksd->bkgts", q_BxKxGxTxD, k_cache_BxKxSxD, preferred_element_type=jnp.float32
  ) * scale
  mask_BxTxS = attention_mask(lengths_B, tree_mask_TxT, S)
  s_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], s_BxKxGxTxS, _NEG_INF)
  m = jnp.max(s_BxKxGxTxS, axis=-1, keepdims=True)
  p = jnp.exp(s_BxKxGxTxS - m)
  p = jnp.where(mask_BxTxS[:, None, None], p, 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  o_BxKxGxTxD = jnp.einsum(
      "bkgts,bksd->bkgtd", p.astype(v_cache_BxKxSxD.dtype), v_cache_BxKxSxD,
      preferred_element_type=jnp.float32,
  )
  return o_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BxTxHxD.dtype)
