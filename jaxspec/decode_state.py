"""The decode state: one pytree holding everything a generation carries between steps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models.kv_cache import KVCache


def _axes(*logical):
  """Field metadata: the logical axes of the array (jaxspec.sharding maps them to a mesh)."""
  return struct.field(metadata={"axes": logical})


@struct.dataclass
class DecodeState:
  """Invariant: cache holds K/V for tokens[b, :cache.lengths[b]]; the committed tokens after
  them are pending (the next forward's first inputs): the last one for every method but LUD's
  lossy mode, which commits tokens read off placeholders and feeds them next step.

  No shape depends on max_new_tokens: the step budget is a value, so a new max_new_tokens
  within one cache size compiles nothing new. Statistics are counters, not per-step logs."""

  tokens: jax.Array = _axes("batch", None)  # [B, N] int32 buffer: prompt then generated tokens
  num_tokens: jax.Array = _axes("batch")  # [B] committed tokens in the buffer
  prompt_lens: jax.Array = _axes("batch")  # [B]
  max_new: jax.Array = _axes("batch")  # [B] budget of new tokens per row
  cache: KVCache  # axes declared on KVCache's fields
  key: jax.Array = _axes()  # PRNG key
  done: jax.Array = _axes("batch")  # [B] bool
  step: jax.Array = _axes()  # scalar int32: decode steps run (prefill not counted)
  max_steps: jax.Array = _axes()  # scalar int32: the decode step budget
  forwards: jax.Array = _axes("batch")  # [B] int32: target forwards per row, prefill included
  forward_tokens: jax.Array = _axes()  # scalar int32: tokens in the decode steps' forwards, summed
  accept_hist: jax.Array = _axes(None)  # [max_commit + 1] int32: active row-steps by tokens committed
  method_state: Any = ()  # axes: the method's `method_state_axes`, else caches like `cache`, rest replicated

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def generated(self) -> jax.Array:
    return self.num_tokens - self.prompt_lens


def last_tokens(state: DecodeState) -> jax.Array:
  """[B] the pending token of each row."""
  return jnp.take_along_axis(state.tokens, (state.num_tokens - 1)[:, None], axis=1)[:, 0]


def pending_counts(state: DecodeState) -> jax.Array:
  """[B] committed tokens of each row without K/V in the cache: the next forward's first inputs
  (1 for every method but LUD's lossy mode)."""
  return state.num_tokens - state.cache.lengths


def append_tokens(state: DecodeState, new_BxM: jax.Array, n_B: jax.Array, eos_ids: tuple[int, ...]):
  """Append the first n[b] of new[b] to row b, cut at the first EOS and at the row's budget.

  Done rows append nothing. Returns (state, n_effective[B]). The cache is not touched.
  """
  B, M = new_BxM.shape
  budget_B = state.max_new - state.generated
  n_B = jnp.where(state.done, 0, jnp.minimum(n_B, budget_B)).astype(jnp.int32)
  idx_M = jnp.arange(M, dtype=jnp.int32)
  if eos_ids:
    is_eos_BxM = jnp.isin(new_BxM, jnp.asarray(eos_ids, jnp.int32)) & (idx_M[None, :] < n_B[:, None])
    hit_B = jnp.any(is_eos_BxM, axis=1)
    n_B = jnp.where(hit_B, jnp.argmax(is_eos_BxM, axis=1).astype(jnp.int32) + 1, n_B)
  else:
    hit_B = jnp.zeros((B,), bool)
  write = lambda row, new, start: jax.lax.dynamic_update_slice(row, new, (start,))
  tokens = jax.vmap(write)(state.tokens, new_BxM.astype(jnp.int32), state.num_tokens)
  num_tokens = state.num_tokens + n_B
  done = state.done | hit_B | (num_tokens - state.prompt_lens >= state.max_new)
  return state.replace(tokens=tokens, num_tokens=num_tokens, done=done), n_B


def record_step(state: DecodeState, n_B: jax.Array, forward_size) -> DecodeState:
  """Account one decode forward of `forward_size` tokens per row that committed n[b] tokens per
  row (0: the row was done)."""
  active_B = (n_B > 0).astype(jnp.int32)
  return state.replace(
      accept_hist=state.accept_hist.at[n_B].add(active_B, mode="drop"),
      forwards=state.forwards + active_B,
      forward_tokens=state.forward_tokens + jnp.asarray(forward_size, jnp.int32),
      step=state.step + 1,
  )
