"""How the Pallas tree-attention kernels see their inputs (shared by the TPU and GPU kernels).

Shape letters as in `tree_attention_reference`, plus: N query blocks, Q new tokens per query
block, R packed rows per query block (>= G*Q), C padded new-token columns (>= T).

Three moves, all cheap XLA ops on arrays of T tokens (the cache itself is never copied):
  * Queries are packed per kv head: the G query heads of one kv group and Q new tokens form
    one block of G*Q rows (head-major, zero rows appended up to R), so each kernel step is
    a tall [R, D] x [D, block] matmul instead of G short ones.
  * The tree mask is expanded to the same row order ([N*R, C], int32): the kernels read it
    as a plain block, no per-row index arithmetic.
  * The K/V of the T new tokens (given apart from the cache) are padded to a dense
    [B, K, C, D] array, so the tree part is one aligned [R, C] block with the tree mask as is,
    and the kernels' cache loop only has to cover the committed prefix s < lengths[b].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_power_of_2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """Static geometry of one call: G heads per group, T tokens, Q tokens/block, N blocks, R rows/block, C cols."""
  G: int
  T: int
  Q: int
  N: int
  R: int
  C: int

  @classmethod
  def make(cls, G: int, T: int, Q: int, R: int, C: int) -> "PackedLayout":
    if R < G * Q or C < T:
      raise ValueError(f"bad packed layout: R={R} < G*Q={G * Q} or C={C} < T={T}")
    return cls(G=G, T=T, Q=Q, N=-(-T // Q), R=R, C=C)


def clip_lengths(lengths_B: jax.Array, num_slots: int) -> jax.Array:
  """int32 [B] in [0, S]: a length past the cache end means every slot is committed."""
  return jnp.clip(lengths_B.astype(jnp.int32), 0, num_slots)


def pack_queries(q_BxTxHxD: jax.Array, num_kv_heads: int, lay: PackedLayout) -> jax.Array:
  """[B, K, N*R, D]: row r of block n is head g = r // Q, token n*Q + r % Q (zeros past G*Q or T)."""
  B, T, H, D = q_BxTxHxD.shape
  K, G, Q, N, R = num_kv_heads, lay.G, lay.Q, lay.N, lay.R
  q_BxTqxHxD = jnp.pad(q_BxTxHxD, ((0, 0), (0, N * Q - T), (0, 0), (0, 0)))
  q_BxNxQxKxGxD = q_BxTqxHxD.reshape(B, N, Q, K, G, D)
  q_BxKxNxGQxD = q_BxNxQxKxGxD.transpose(0, 3, 1, 4, 2, 5).reshape(B, K, N, G * Q, D)
  q_BxKxNxRxD = jnp.pad(q_BxKxNxGQxD, ((0, 0), (0, 0), (0, 0), (0, R - G * Q), (0, 0)))
  return q_BxKxNxRxD.reshape(B, K, N * R, D)


def unpack_outputs(o_BxKxNRxD: jax.Array, lay: PackedLayout) -> jax.Array:
  """Inverse of `pack_queries`: [B, T, H, D], padding rows dropped."""
  B, K, _, D = o_BxKxNRxD.shape
  G, Q, N, R, T = lay.G, lay.Q, lay.N, lay.R, lay.T
  o_BxKxNxGQxD = o_BxKxNRxD.reshape(B, K, N, R, D)[:, :, :, : G * Q]
  o_BxNxQxKxGxD = o_BxKxNxGQxD.reshape(B, K, N, G, Q, D).transpose(0, 2, 4, 1, 3, 5)
  return o_BxNxQxKxGxD.reshape(B, N * Q, K * G, D)[:, :T]


def pack_tree_mask(tree_mask_TxT: jax.Array, lay: PackedLayout) -> jax.Array:
  """int32 [N*R, C]: row r of block n holds tree_mask[n*Q + r % Q] (zeros for padding rows/cols)."""
  G, Q, N, R, C, T = lay.G, lay.Q, lay.N, lay.R, lay.C, lay.T
  tree_TqxC = jnp.pad(tree_mask_TxT.astype(jnp.int32), ((0, N * Q - T), (0, C - T)))
  tree_NxGQxC = jnp.broadcast_to(tree_TqxC.reshape(N, 1, Q, C), (N, G, Q, C)).reshape(N, G * Q, C)
  return jnp.pad(tree_NxGQxC, ((0, 0), (0, R - G * Q), (0, 0))).reshape(N * R, C)


def pad_new_kv(new_BxKxTxD: jax.Array, lay: PackedLayout) -> jax.Array:
  """[B, K, C, D]: the new tokens' K or V, zero columns past T. The kernels mask column u of
  row b off when lengths[b] + u >= S (no slot for it), as the reference does."""
  return jnp.pad(new_BxKxTxD, ((0, 0), (0, 0), (0, lay.C - lay.T), (0, 0)))
