"""Tree attention as a Pallas TPU (Mosaic) kernel; same contract as `tree_attention_reference`.

Grid (B, K, N, kv blocks). One grid step is a [R, D] block of packed queries (the G heads of
one kv group times Q new tokens, see `tree_attention_layout`) against one [block_k, D] block
of the cache, flash-style: running max / denominator / fp32 accumulator live in VMEM scratch
across the kv axis (the last, "arbitrary" grid axis).

  * kv step 0 also folds in the tree part: the new tokens' K/V (given apart from the cache,
    padded by the wrapper) under the tree mask, so the running state starts from the
    always-present diagonal.
  * Cache blocks at or past lengths[b] hold no committed slot: the kernel skips their compute,
    and their index_map is clamped to the last needed block, so the pipeline sees an unchanged
    block index and issues no new DMA. lengths arrive by scalar prefetch (SMEM).
  * S need not be a multiple of block_k: the last block is partial, its out-of-range rows are
    whatever the padding holds, and both the scores and V rows are masked by slot < lengths[b].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxspec.kernels import tree_attention_layout as layout

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so exp(m_prev - m_next) never sees inf - inf
_LANES = 128  # m and l scratch are lane-replicated [R, 128]: a full vreg row, no masked stores
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block sizes of the TPU kernel.

  block_q: new tokens per query block; its G heads come with it, so the MXU sees G*block_q
    rows. Rounded to a multiple of 16 (bf16 sublane tiling) and capped at T rounded up.
  block_k: cache slots per kv grid step, a multiple of 16 (128 keeps the [rows, block_k]
    scores lane-dense); S itself is used when S <= block_k.
  The new tokens are padded to a multiple of 128 columns (lane-dense tree scores).
  """
  block_q: int = 128
  block_k: int = 512


def _layout(G: int, T: int, block_q: int) -> layout.PackedLayout:
  Q = min(layout.round_up(block_q, 16), layout.round_up(T, 16))
  return layout.PackedLayout.make(G=G, T=T, Q=Q, R=G * Q, C=layout.round_up(T, 128))


def _kernel(lengths_ref,  # SMEM [B] int32, scalar prefetch
            q_ref,  # [R, D]
            tree_ref,  # [R, C] int32
            k_new_ref, v_new_ref,  # [C, D]
            k_ref, v_ref,  # [block_k, D]
            o_ref,  # [R, D]
            m_ref, l_ref,  # VMEM [R, 128] f32
            acc_ref,  # VMEM [R, D] f32
            *, scale: float, block_k: int, num_slots: int):
  b, kv = pl.program_id(0), pl.program_id(3)
  length = lengths_ref[b]
  R, D = q_ref.shape

  @pl.when(kv == 0)
  def _tree_part():
    s_RxC = lax.dot_general(q_ref[...], k_new_ref[...], _NT,
                            preferred_element_type=jnp.float32) * scale
    col_RxC = lax.broadcasted_iota(jnp.int32, s_RxC.shape, 1)
    # Column u exists only if its slot lengths[b] + u is inside the cache.
    allowed_RxC = (tree_ref[...] != 0) & (col_RxC < num_slots - length)
    s_RxC = jnp.where(allowed_RxC, s_RxC, _MASK)
    m_Rx1 = jnp.max(s_RxC, axis=1, keepdims=True)
    p_RxC = jnp.where(allowed_RxC, jnp.exp(s_RxC - m_Rx1), 0.0)
    m_ref[...] = jnp.broadcast_to(m_Rx1, (R, _LANES))
    l_ref[...] = jnp.broadcast_to(jnp.sum(p_RxC, axis=1, keepdims=True), (R, _LANES))
    acc_ref[...] = jnp.dot(p_RxC.astype(v_new_ref.dtype), v_new_ref[...],
                           preferred_element_type=jnp.float32)

  @pl.when(kv * block_k < length)
  def _prefix_part():
    s_RxK = lax.dot_general(q_ref[...], k_ref[...], _NT,
                            preferred_element_type=jnp.float32) * scale
    slot_RxK = kv * block_k + lax.broadcasted_iota(jnp.int32, s_RxK.shape, 1)
    committed_RxK = slot_RxK < length
    s_RxK = jnp.where(committed_RxK, s_RxK, _MASK)
    m_prev_Rx1 = m_ref[...][:, :1]
    m_next_Rx1 = jnp.maximum(m_prev_Rx1, jnp.max(s_RxK, axis=1, keepdims=True))
    alpha_Rx1 = jnp.exp(m_prev_Rx1 - m_next_Rx1)
    p_RxK = jnp.where(committed_RxK, jnp.exp(s_RxK - m_next_Rx1), 0.0)
    l_next_Rx1 = alpha_Rx1 * l_ref[...][:, :1] + jnp.sum(p_RxK, axis=1, keepdims=True)
    # Rows past the committed prefix (or past S in a partial last block) may hold anything,
    # NaN included; 0 * NaN would poison the accumulator, so zero them.
    slot_KxD = kv * block_k + lax.broadcasted_iota(jnp.int32, (block_k, D), 0)
    v_KxD = jnp.where(slot_KxD < length, v_ref[...], jnp.zeros((), v_ref.dtype))
    acc_ref[...] = alpha_Rx1 * acc_ref[...] + jnp.dot(
        p_RxK.astype(v_KxD.dtype), v_KxD, preferred_element_type=jnp.float32)
    m_ref[...] = jnp.broadcast_to(m_next_Rx1, (R, _LANES))
    l_ref[...] = jnp.broadcast_to(l_next_Rx1, (R, _LANES))

  @pl.when(kv == pl.num_programs(3) - 1)
  def _finish():
    l_Rx1 = l_ref[...][:, :1]
    # A row with no allowed key has l == 0 and acc == 0: it returns zeros, like the reference.
    o_ref[...] = (acc_ref[...] / jnp.where(l_Rx1 == 0.0, 1.0, l_Rx1)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def tree_attention_tpu(
    q_BxTxHxD: jax.Array,
    k_cache_BxKxSxD: jax.Array,
    v_cache_BxKxSxD: jax.Array,
    lengths_B: jax.Array,
    tree_mask_TxT: jax.Array,
    k_new_BxKxTxD: jax.Array,
    v_new_BxKxTxD: jax.Array,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """Pallas TPU tree attention: [B, T, H, D], the contract of `tree_attention_reference`.

  fp32 accumulation; output in q's dtype. interpret=True runs the kernel in TPU interpret mode
  (`pltpu.InterpretParams()`, works on CPU); an InterpretParams instance is passed through.
  """
  B, T, H, D = q_BxTxHxD.shape
  K, S = k_cache_BxKxSxD.shape[1], k_cache_BxKxSxD.shape[2]
  if H % K:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
  G = H // K
  scale = D**-0.5 if scale is None else scale
  lay = _layout(G, T, block_sizes.block_q)
  block_k = S if S <= block_sizes.block_k else block_sizes.block_k
  if block_k != S and block_k % 16:
    raise ValueError(f"block_k={block_k} must be a multiple of 16 (or at least S={S})")
  num_kv_blocks = pl.cdiv(S, block_k)

  lengths_B = layout.clip_lengths(lengths_B, S)
  q_BxKxNRxD = layout.pack_queries(q_BxTxHxD, K, lay)
  tree_NRxC = layout.pack_tree_mask(tree_mask_TxT, lay)
  k_new_BxKxCxD = layout.pad_new_kv(k_new_BxKxTxD, lay)
  v_new_BxKxCxD = layout.pad_new_kv(v_new_BxKxTxD, lay)

  def q_map(b, h, n, kv, lengths_ref):
    return b, h, n, 0

  def tree_map(b, h, n, kv, lengths_ref):
    return n, 0

  def new_kv_map(b, h, n, kv, lengths_ref):
    return b, h, 0, 0

  def cache_map(b, h, n, kv, lengths_ref):
    # Past the last block holding a committed slot, repeat that block: same index, no DMA.
    last_needed = jnp.maximum(pl.cdiv(lengths_ref[b], block_k) - 1, 0)
    return b, h, jnp.minimum(kv, last_needed), 0

  sq = pl.Squeezed()
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(B, K, lay.N, num_kv_blocks),
      in_specs=[
          pl.BlockSpec((sq, sq, lay.R, D), q_map),
          pl.BlockSpec((lay.R, lay.C), tree_map),
          pl.BlockSpec((sq, sq, lay.C, D), new_kv_map),
          pl.BlockSpec((sq, sq, lay.C, D), new_kv_map),
          pl.BlockSpec((sq, sq, block_k, D), cache_map),
          pl.BlockSpec((sq, sq, block_k, D), cache_map),
      ],
      out_specs=pl.BlockSpec((sq, sq, lay.R, D), q_map),
      scratch_shapes=[
          pltpu.VMEM((lay.R, _LANES), jnp.float32),
          pltpu.VMEM((lay.R, _LANES), jnp.float32),
          pltpu.VMEM((lay.R, D), jnp.float32),
      ],
  )
  if interpret is True:
    interpret = pltpu.InterpretParams()
  o_BxKxNRxD = pl.pallas_call(
      functools.partial(_kernel, scale=float(scale), block_k=block_k, num_slots=S),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q_BxKxNRxD.shape, q_BxTxHxD.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tree_attention_tpu",
  )(lengths_B, q_BxKxNRxD, tree_NRxC, k_new_BxKxCxD, v_new_BxKxCxD, k_cache_BxKxSxD,
    v_cache_BxKxSxD)
  return layout.unpack_outputs(o_BxKxNRxD, lay)
