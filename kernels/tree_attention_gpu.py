"""Tree attention as a Pallas GPU (Triton) kernel; same contract as `tree_attention_reference`.

Grid (B, K, N): one program owns a [R, D] block of packed queries (the G heads of one kv group
times Q new tokens, see `tree_attention_layout`), starts its online softmax from the tree part
(the new tokens' K/V, given apart from the cache, under the tree mask) and then loops over the
committed prefix in [block_k, D] steps, stopping at lengths[b]: blocks past it are never read.

Triton wants power-of-two tensor sizes (and >= 16 for `dot`), so R, C and D are powers of two
>= 16: R and C by padding the small packed arrays, D by padding the cache (a copy; the usual
head dims 64 and 128 need none). S needs no padding: the last cache block starts at
S - block_k instead of past the end, and slots it already covered are masked off.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxspec.kernels import tree_attention_layout as layout

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so exp(m_prev - m_next) never sees inf - inf
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_MIN_DIM = 16  # tl.dot's smallest operand dimension


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block sizes and launch settings of the GPU kernel.

  block_rows: packed query rows per program (power of two). Q = block_rows // G new tokens of
    all G heads share a program; rows are padded up to a power of two >= 16.
  block_k: cache slots per loop step (power of two >= 16; capped at the largest power of two
    <= S).
  num_warps, num_stages: Triton launch settings.
  """
  block_rows: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


def _layout(G: int, T: int, block_rows: int) -> layout.PackedLayout:
  Q = max(1, min(T, block_rows // G))
  R = layout.next_power_of_2(max(G * Q, _MIN_DIM))
  return layout.PackedLayout.make(G=G, T=T, Q=Q, R=R, C=layout.next_power_of_2(max(T, _MIN_DIM)))


def _kernel(lengths_ref,  # [1] int32
            q_ref,  # [R, D]
            tree_ref,  # [R, C] int32
            k_new_ref, v_new_ref,  # [C, D]
            k_ref, v_ref,  # [S', D], S' = max(S, 16)
            o_ref,  # [R, D]
            *, scale: float, block_k: int, num_slots: int):
  length = lengths_ref[0]
  q_RxD = q_ref[...]
  C = k_new_ref.shape[0]
  padded_slots = k_ref.shape[0]

  # Tree part first: the diagonal is (normally) allowed, so the running max starts finite.
  s_RxC = lax.dot_general(q_RxD, k_new_ref[...], _NT, preferred_element_type=jnp.float32) * scale
  # Column u exists only if its slot lengths[b] + u is inside the cache.
  allowed_RxC = (tree_ref[...] != 0) & (jnp.arange(C)[None, :] < num_slots - length)
  s_RxC = jnp.where(allowed_RxC, s_RxC, _MASK)
  m_R = jnp.max(s_RxC, axis=1)
  p_RxC = jnp.where(allowed_RxC, jnp.exp(s_RxC - m_R[:, None]), 0.0)
  l_R = jnp.sum(p_RxC, axis=1)
  acc_RxD = jnp.dot(p_RxC.astype(v_new_ref.dtype), v_new_ref[...],
                    preferred_element_type=jnp.float32)

  def prefix_step(i, carry):
    acc_RxD, m_R, l_R = carry
    # The last block is shifted back to end at the cache end; its slots below i * block_k
    # were counted by the previous step and are masked off here.
    start = jnp.minimum(i * block_k, padded_slots - block_k)
    slot_K = start + jnp.arange(block_k)
    committed_K = (slot_K >= i * block_k) & (slot_K < length)
    k_KxD = k_ref[pl.ds(start, block_k), :]
    v_KxD = v_ref[pl.ds(start, block_k), :]
    s_RxK = lax.dot_general(q_RxD, k_KxD, _NT, preferred_element_type=jnp.float32) * scale
    s_RxK = jnp.where(committed_K[None, :], s_RxK, _MASK)
    m_next_R = jnp.maximum(m_R, jnp.max(s_RxK, axis=1))
    alpha_R = jnp.exp(m_R - m_next_R)
    p_RxK = jnp.where(committed_K[None, :], jnp.exp(s_RxK - m_next_R[:, None]), 0.0)
    l_next_R = alpha_R * l_R + jnp.sum(p_RxK, axis=1)
    # Slots past the committed prefix may hold anything, NaN included; 0 * NaN would poison acc.
    v_KxD = jnp.where(committed_K[:, None], v_KxD, jnp.zeros((), v_KxD.dtype))
    acc_RxD = alpha_R[:, None] * acc_RxD + jnp.dot(
        p_RxK.astype(v_KxD.dtype), v_KxD, preferred_element_type=jnp.float32)
    return acc_RxD, m_next_R, l_next_R

  num_steps = (length + block_k - 1) // block_k
  acc_RxD, m_R, l_R = lax.fori_loop(0, num_steps, prefix_step, (acc_RxD, m_R, l_R))
  # A row with no allowed key has l == 0 and acc == 0: it returns zeros, like the reference.
  o_ref[...] = (acc_RxD / jnp.where(l_R == 0.0, 1.0, l_R)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def tree_attention_gpu(
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
    interpret: bool = False,
) -> jax.Array:
  """Pallas GPU (Triton) tree attention: [B, T, H, D], the contract of `tree_attention_reference`.

  fp32 accumulation (fp32 inputs use IEEE fp32 dots, not TF32); output in q's dtype.
  interpret=True runs the kernel through Pallas' generic interpreter (works on CPU).
  """
  B, T, H, D = q_BxTxHxD.shape
  K, S = k_cache_BxKxSxD.shape[1], k_cache_BxKxSxD.shape[2]
  if H % K:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
  for name, v in (("block_rows", block_sizes.block_rows), ("block_k", block_sizes.block_k)):
    if v < _MIN_DIM or v & (v - 1):
      raise ValueError(f"{name}={v} must be a power of two >= {_MIN_DIM}")
  G = H // K
  scale = D**-0.5 if scale is None else scale
  lay = _layout(G, T, block_sizes.block_rows)

  lengths_B = layout.clip_lengths(lengths_B, S)
  q_BxKxNRxD = layout.pack_queries(q_BxTxHxD, K, lay)
  tree_NRxC = layout.pack_tree_mask(tree_mask_TxT, lay)
  k_new_BxKxCxD = layout.pad_new_kv(k_new_BxKxTxD, lay)
  v_new_BxKxCxD = layout.pad_new_kv(v_new_BxKxTxD, lay)

  # Zero padding never counts: padded head-dim columns add 0 to q.k, and padded slots are
  # >= S >= lengths[b], outside every committed prefix.
  Dp = layout.next_power_of_2(max(D, _MIN_DIM))
  Sp = max(S, _MIN_DIM)
  pad_d = ((0, 0), (0, 0), (0, 0), (0, Dp - D))
  q_BxKxNRxD, k_new_BxKxCxD, v_new_BxKxCxD = (
      jnp.pad(x, pad_d) for x in (q_BxKxNRxD, k_new_BxKxCxD, v_new_BxKxCxD))
  if Dp != D or Sp != S:
    pad_sd = ((0, 0), (0, 0), (0, Sp - S), (0, Dp - D))
    k_cache_BxKxSxD = jnp.pad(k_cache_BxKxSxD, pad_sd)
    v_cache_BxKxSxD = jnp.pad(v_cache_BxKxSxD, pad_sd)
  block_k = min(block_sizes.block_k, 1 << (Sp.bit_length() - 1))

  sq = pl.Squeezed()
  o_BxKxNRxD = pl.pallas_call(
      functools.partial(_kernel, scale=float(scale), block_k=block_k, num_slots=S),
      grid=(B, K, lay.N),
      in_specs=[
          pl.BlockSpec((sq, 1), lambda b, h, n: (b, 0)),
          pl.BlockSpec((sq, sq, lay.R, Dp), lambda b, h, n: (b, h, n, 0)),
          pl.BlockSpec((lay.R, lay.C), lambda b, h, n: (n, 0)),
          pl.BlockSpec((sq, sq, lay.C, Dp), lambda b, h, n: (b, h, 0, 0)),
          pl.BlockSpec((sq, sq, lay.C, Dp), lambda b, h, n: (b, h, 0, 0)),
          pl.BlockSpec((sq, sq, Sp, Dp), lambda b, h, n: (b, h, 0, 0)),
          pl.BlockSpec((sq, sq, Sp, Dp), lambda b, h, n: (b, h, 0, 0)),
      ],
      out_specs=pl.BlockSpec((sq, sq, lay.R, Dp), lambda b, h, n: (b, h, n, 0)),
      out_shape=jax.ShapeDtypeStruct(q_BxKxNRxD.shape, q_BxTxHxD.dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="tree_attention_gpu",
  )(lengths_B[:, None], q_BxKxNRxD, tree_NRxC, k_new_BxKxCxD, v_new_BxKxCxD, k_cache_BxKxSxD,
    v_cache_BxKxSxD)
  return layout.unpack_outputs(o_BxKxNRxD[..., :D], lay)
