"""Tree attention in plain XLA: the oracle for the Pallas kernels and the CPU path.

Shapes (single letters used throughout jaxspec.kernels):
  B batch rows, T new (query) tokens, H query heads, K kv heads, G = H // K query heads per
  kv head, S cache slots, D head dim.

Contract: the cache holds each row's committed prefix in slots [0, lengths[b]); the K/V of the
T new tokens come separately (`k_new`, `v_new`: [B, K, T, D]; the caller writes them to slots
lengths[b] + u afterwards). Query t of row b may attend to
  * every committed slot s < lengths[b], and
  * new token u iff tree_mask[t, u] and its slot lengths[b] + u lies inside the cache (u < S -
    lengths[b]; without a cache, every u).
Nothing else: cache slots >= lengths[b] never count (here they enter the dots with weight 0,
so they must be finite; the Pallas kernels do not read them at all). A causal chain is the lower-triangular
mask; a tree is ancestor-or-self. The mask is [T, T] for the whole batch or [B, T, T] per row
(rows whose drafts differ in shape, training examples with their own masks).

Why the new tokens come apart from the cache: the attention then only reads the cache, so the
caller's write of the new K/V can update it in place afterwards. Reading the cache after the
write made XLA CPU copy every layer's K and V each decode step (experiments/LOG.md, sessions 3 and 9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def new_token_mask(lengths_B: jax.Array, tree_mask_TxT: jax.Array, num_slots: int | None) -> jax.Array:
  """Boolean [B, T, T]: may query t of row b attend to new token u (tree mask; its slot inside the cache)."""
  T = tree_mask_TxT.shape[-1]
  B = lengths_B.shape[0]
  tree_BxTxT = jnp.broadcast_to(tree_mask_TxT.astype(bool), (B, T, T))
  if num_slots is None:
    return tree_BxTxT
  fits_BxT = jnp.arange(T, dtype=jnp.int32)[None, :] < num_slots - lengths_B[:, None].astype(jnp.int32)
  return tree_BxTxT & fits_BxT[:, None, :]


def tree_attention_reference(
    q_BxTxHxD: jax.Array,
    k_cache_BxKxSxD: jax.Array | None,
    v_cache_BxKxSxD: jax.Array | None,
    lengths_B: jax.Array,
    tree_mask_TxT: jax.Array,
    k_new_BxKxTxD: jax.Array,
    v_new_BxKxTxD: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
  """Softmax attention of the new queries over the committed prefix + allowed new tokens;
  returns [B, T, H, D]. `k_cache`/`v_cache` None: no prefix (training).

  One softmax over both parts (shared running max), accumulated in fp32 whatever the input
  dtype; output has q's dtype. A query with no allowed key (impossible when tree_mask has its
  diagonal set) returns zeros.
  """
  B, T, H, D = q_BxTxHxD.shape
  K = k_new_BxKxTxD.shape[1]
  if H % K:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
  G = H // K
  scale = D**-0.5 if scale is None else scale
  q_BxKxGxTxD = q_BxTxHxD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
  has_cache = k_cache_BxKxSxD is not None
  new_BxTxU = new_token_mask(lengths_B, tree_mask_TxT, k_cache_BxKxSxD.shape[2] if has_cache else None)
  new_1 = new_BxTxU[:, None, None]  # [B, 1, 1, T, U]
  s_new = jnp.einsum("bkgtd,bkud->bkgtu", q_BxKxGxTxD, k_new_BxKxTxD, preferred_element_type=jnp.float32) * scale
  s_new = jnp.where(new_1, s_new, _NEG_INF)
  m = jnp.max(s_new, axis=-1, keepdims=True)
  if has_cache:
    S = k_cache_BxKxSxD.shape[2]
    # The cache as the dot's left operand ([S, D] rows, contracting D): XLA CPU then reads it as
    # stored; as the right operand it transposed every layer's K each step.
    s_BxKxSxGxT = jax.lax.dot_general(k_cache_BxKxSxD, q_BxKxGxTxD, (((3,), (4,)), ((0, 1), (0, 1))),
                                      preferred_element_type=jnp.float32)
    s_cache = s_BxKxSxGxT.transpose(0, 1, 3, 4, 2) * scale  # [B, K, G, T, S]
    committed_1 = (jnp.arange(S, dtype=jnp.int32)[None, :] < lengths_B[:, None])[:, None, None, None, :]
    s_cache = jnp.where(committed_1, s_cache, _NEG_INF)
    m = jnp.maximum(m, jnp.max(s_cache, axis=-1, keepdims=True))
  p_new = jnp.where(new_1, jnp.exp(s_new - m), 0.0)
  denom = jnp.sum(p_new, axis=-1, keepdims=True)
  o_BxKxGxTxD = jnp.einsum("bkgtu,bkud->bkgtd", p_new.astype(v_new_BxKxTxD.dtype), v_new_BxKxTxD,
                           preferred_element_type=jnp.float32)
  if has_cache:
    p_cache = jnp.where(committed_1, jnp.exp(s_cache - m), 0.0)
    denom = denom + jnp.sum(p_cache, axis=-1, keepdims=True)
    o_BxKxGxTxD = o_BxKxGxTxD + jnp.einsum("bkgts,bksd->bkgtd", p_cache.astype(v_cache_BxKxSxD.dtype),
                                           v_cache_BxKxSxD, preferred_element_type=jnp.float32)
  o_BxKxGxTxD = o_BxKxGxTxD / jnp.where(denom == 0, 1.0, denom)
  return o_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BxTxHxD.dtype)
