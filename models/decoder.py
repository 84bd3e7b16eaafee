"""Flax NNX decoder for the Llama family (SmolLM2, Llama 2/3, Mistral) and Qwen2/2.5.

GQA, RoPE (HF convention), RMSNorm, SwiGLU, tied or untied embeddings, optional q/k/v bias.
Every parameter carries logical axis names (`logical_axes` metadata) for jaxspec.sharding.

The forward implements the one forward contract, for decoding and for training:
  logits, hidden, cache = model(cache, tokens[B,T], positions[B,T], mask[T,T] or [B,T,T],
                                capture=(), logits_index_BxN=None, attn_impl="auto",
                                num_layers=None, edit=None, start_layer=0, inputs_BxTxE=None)
With a cache, new K/V go to scratch slots after each row's committed prefix (`cache.lengths` is
unchanged) and the tokens attend to that prefix plus what `mask` allows among them. With
cache=None it is plain masked attention over the given tokens (differentiable, what trainers
use); it returns cache None.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.kernels import tree_attention
from jaxspec.models.config import ModelConfig
from jaxspec.models.kv_cache import KVCache, write_scratch
from jaxspec.models.rope import apply_rope, rope_cos_sin


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal", scale=0.02):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


def linear(module: nnx.Module, name: str, x_BxTxI: jax.Array) -> jax.Array:
  """x @ W for the weight `name` ([in, out]). When the module also holds `name + "_T"` ([out, in],
  see jaxspec.models.cpu_layout) and T > 1, use it: on XLA CPU a few-token matmul against a
  row-major [out, in] weight streams it once, while [in, out] takes a slower packed-GEMM path."""
  transposed = getattr(module, name + "_T", None)
  if transposed is not None and x_BxTxI.shape[1] > 1:
    return jnp.einsum("oi,bti->bto", transposed[...], x_BxTxI)
  return x_BxTxI @ getattr(module, name)[...]


def rms_norm(x_BxTxE: jax.Array, weight_E: jax.Array, eps: float) -> jax.Array:
  x32 = x_BxTxE.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * weight_E.astype(jnp.float32)).astype(x_BxTxE.dtype)


class Attention(nnx.Module):
  def __init__(self, c: ModelConfig, dtype, rngs: nnx.Rngs):
    self.c = c
    E, H, K, D = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    self.q_ExHD = _param(rngs, (E, H * D), ("embed", "heads"), dtype)
    self.k_ExKD = _param(rngs, (E, K * D), ("embed", "kv_heads"), dtype)
    self.v_ExKD = _param(rngs, (E, K * D), ("embed", "kv_heads"), dtype)
    self.o_HDxE = _param(rngs, (H * D, E), ("heads", "embed"), dtype)
    if c.qkv_bias:
      self.q_bias = _param(rngs, (H * D,), ("heads",), dtype, init="zeros")
      self.k_bias = _param(rngs, (K * D,), ("kv_heads",), dtype, init="zeros")
      self.v_bias = _param(rngs, (K * D,), ("kv_heads",), dtype, init="zeros")

  def __call__(self, x_BxTxE, cos, sin, k_cache, v_cache, lengths_B, tree_mask_TxT, attn_impl, write_cache=True):
    """(output, K, V): K/V the cache with the new tokens written, or (write_cache=False) the new
    tokens' own [B, K, T, D]."""
    c = self.c
    B, T, _ = x_BxTxE.shape
    q = linear(self, "q_ExHD", x_BxTxE)
    k = linear(self, "k_ExKD", x_BxTxE)
    v = linear(self, "v_ExKD", x_BxTxE)
    if c.qkv_bias:
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    q_BxTxHxD = apply_rope(q.reshape(B, T, c.num_heads, c.head_dim), cos, sin)
    k_BxTxKxD = apply_rope(k.reshape(B, T, c.num_kv_heads, c.head_dim), cos, sin)
    v_BxTxKxD = v.reshape(B, T, c.num_kv_heads, c.head_dim)
    k_new_BxKxTxD, v_new_BxKxTxD = k_BxTxKxD.transpose(0, 2, 1, 3), v_BxTxKxD.transpose(0, 2, 1, 3)
    # Attend first, write after: the attention reads the committed prefix and takes the new K/V
    # apart, so the cache write below can happen in place (kernels/tree_attention_reference.py).
    o_BxTxHxD = tree_attention(q_BxTxHxD, k_cache, v_cache, lengths_B, tree_mask_TxT, k_new_BxKxTxD,
                               v_new_BxKxTxD, impl=attn_impl)
    out = linear(self, "o_HDxE", o_BxTxHxD.reshape(B, T, c.num_heads * c.head_dim))
    if not write_cache:
      return out, k_new_BxKxTxD, v_new_BxKxTxD
    if k_cache is not None:
      k_cache = write_scratch(k_cache, k_new_BxKxTxD, lengths_B)
      v_cache = write_scratch(v_cache, v_new_BxKxTxD, lengths_B)
    return out, k_cache, v_cache


class Mlp(nnx.Module):
  def __init__(self, c: ModelConfig, dtype, rngs: nnx.Rngs):
    E, F = c.embed_dim, c.mlp_dim
    self.gate_ExF = _param(rngs, (E, F), ("embed", "mlp"), dtype)
    self.up_ExF = _param(rngs, (E, F), ("embed", "mlp"), dtype)
    self.down_FxE = _param(rngs, (F, E), ("mlp", "embed"), dtype)

  def __call__(self, x_BxTxE):
    h = jax.nn.silu(linear(self, "gate_ExF", x_BxTxE)) * linear(self, "up_ExF", x_BxTxE)
    return linear(self, "down_FxE", h)


class Block(nnx.Module):
  def __init__(self, c: ModelConfig, dtype, rngs: nnx.Rngs):
    self.c = c
    self.attn_norm_E = _param(rngs, (c.embed_dim,), ("embed",), dtype, init="ones")
    self.attn = Attention(c, dtype, rngs)
    self.mlp_norm_E = _param(rngs, (c.embed_dim,), ("embed",), dtype, init="ones")
    self.mlp = Mlp(c, dtype, rngs)

  def __call__(self, x_BxTxE, cos, sin, k_cache, v_cache, lengths_B, tree_mask_TxT, attn_impl, write_cache=True):
    h = rms_norm(x_BxTxE, self.attn_norm_E[...], self.c.rms_norm_eps)
    a, k_cache, v_cache = self.attn(h, cos, sin, k_cache, v_cache, lengths_B, tree_mask_TxT, attn_impl, write_cache)
    x_BxTxE = x_BxTxE + a
    x_BxTxE = x_BxTxE + self.mlp(rms_norm(x_BxTxE, self.mlp_norm_E[...], self.c.rms_norm_eps))
    return x_BxTxE, k_cache, v_cache


class Decoder(nnx.Module):
  """Decoder-only transformer. Build with random weights, or load with jaxspec.models.load."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    c = self.config = config
    self.embed_VxE = _param(rngs, (c.vocab_size, c.embed_dim), ("vocab", "embed"), dtype)
    self.blocks = nnx.List([Block(c, dtype, rngs) for _ in range(c.num_layers)])
    self.final_norm_E = _param(rngs, (c.embed_dim,), ("embed",), dtype, init="ones")
    if not c.tie_embeddings:
      self.lm_head_ExV = _param(rngs, (c.embed_dim, c.vocab_size), ("embed", "vocab"), dtype)

  def head_columns(self, ids_N: jax.Array) -> jax.Array:
    """[E, N] the LM head's columns of tokens `ids_N` (for `logits(x, head_ExN)`; gather once)."""
    if self.config.tie_embeddings:
      return self.embed_VxE[...][ids_N].T
    return self.lm_head_ExV[...][:, ids_N]

  def logits(self, x_BxTxE: jax.Array, head_ExN: jax.Array | None = None) -> jax.Array:
    """LM head on final-normed states; fp32 logits [B, T, V], or [B, T, N] over the N tokens whose
    LM-head columns `head_ExN` holds (a drafter's short vocabulary: reads N/V of the head)."""
    if head_ExN is not None:
      return jnp.einsum("bte,en->btn", x_BxTxE, head_ExN, preferred_element_type=jnp.float32)
    if self.config.tie_embeddings:
      return jnp.einsum("bte,ve->btv", x_BxTxE, self.embed_VxE[...], preferred_element_type=jnp.float32)
    return jnp.einsum("bte,ev->btv", x_BxTxE, self.lm_head_ExV[...], preferred_element_type=jnp.float32)

  def __call__(
      self,
      cache: KVCache | None,
      tokens_BxT: jax.Array,
      positions_BxT: jax.Array,
      tree_mask_TxT: jax.Array | None = None,
      capture: Sequence[int] = (),
      logits_index_BxN: jax.Array | None = None,
      attn_impl: str = "auto",
      num_layers: int | None = None,
      edit: Callable[[int, jax.Array], jax.Array] | None = None,
      start_layer: int = 0,
      inputs_BxTxE: jax.Array | None = None,
      write_cache: bool = True,
      head_ExN: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[int, jax.Array], KVCache | None]:
    """Forward T new tokens per row. Returns (logits [B,T,V] fp32 (or [B,N,V] at
    `logits_index`), {layer: residual [B,T,E] after that block}, cache with new K/V written).

    `tree_mask`: [T, T], or [B, T, T] per row; None = causal. `cache` None: no cache (training).
    `capture` layer ids are 0-based block indices; -1 means the last block. `num_layers` runs
    only the first blocks before the final norm and LM head (early exit: a self-drafter).
    `edit(i, x_BxTxE) -> x_BxTxE` rewrites the residual stream after block i (e.g. pseudo
    states written at layer t, then run through layers t+1..L); captures see the edited stream.
    `start_layer` > 0 with `inputs_BxTxE` (the residual stream entering that block; `tokens` is
    then unused and may be None) runs only blocks start_layer.. (a partial pass: pseudo states
    through the upper layers); the cache's K/V of the skipped blocks are left as they are.
    `write_cache=False` only reads the cache and returns, in its place, the new tokens' K/V
    (a KVCache of T slots per layer, None for skipped blocks) for `kv_cache.write_new` to write
    later: a forward inside `lax.switch` then never passes the cache through the conditional.
    `head_ExN`: logits over a sub-vocabulary only (see `logits`).
    """
    c = self.config
    B, T = positions_BxT.shape
    capture = {l % c.num_layers for l in capture}
    if tree_mask_TxT is None:
      tree_mask_TxT = jnp.tril(jnp.ones((T, T), bool))
    if (inputs_BxTxE is None) != (start_layer == 0):
      raise ValueError("inputs_BxTxE is given exactly when start_layer > 0")
    x = self.embed_VxE[...][tokens_BxT] if inputs_BxTxE is None else inputs_BxTxE
    cos, sin = rope_cos_sin(positions_BxT, c.head_dim, c.rope_theta)
    L = len(self.blocks)
    ks, vs = (list(cache.k), list(cache.v)) if cache is not None else ([None] * L, [None] * L)
    new_ks, new_vs = [None] * L, [None] * L  # write_cache=False: the new tokens' K/V per block run
    lengths_B = cache.lengths if cache is not None else jnp.zeros((B,), jnp.int32)
    hidden = {}
    for i, block in enumerate(self.blocks):
      if num_layers is not None and i >= num_layers:
        break
      if i < start_layer:
        continue
      x, k_i, v_i = block(x, cos, sin, ks[i], vs[i], lengths_B, tree_mask_TxT, attn_impl, write_cache)
      if write_cache:
        ks[i], vs[i] = k_i, v_i
      else:
        new_ks[i], new_vs[i] = k_i, v_i
      if edit is not None:
        x = edit(i, x)
      if i in capture:
        hidden[i] = x
    x = rms_norm(x, self.final_norm_E[...], c.rms_norm_eps)
    if logits_index_BxN is not None:
      x = jnp.take_along_axis(x, logits_index_BxN[:, :, None], axis=1)
    if not write_cache:
      ks, vs = new_ks, new_vs
    out_cache = cache.replace(k=tuple(ks), v=tuple(vs)) if cache is not None else None
    return self.logits(x, head_ExN), hidden, out_cache
