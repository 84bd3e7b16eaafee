"""The decode state: one pytree holding everything a generation carries between steps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models.kv_cache import KVCache, advance


@struct.dataclass
class DecodeState:
  """Invariant: cache holds K/V for tokens[b, :num_tokens[b] - 1]; the last committed token of
  each row is pending (it is the next forward's first input)."""

  tokens: jax.Array  # [B, N] int32 buffer: prompt then generated tokens
  num_tokens: jax.Array  # [B] committed tokens in the buffer
  prompt_lens: jax.Array  # [B]
  max_new: jax.Array  # [B] budget of new tokens per row
  cache: KVCache
  key: jax.Array  # PRNG key
  done: jax.Array  # [B] bool
  step: jax.Array  # scalar int32: decode forwards so far (prefill not counted)
  committed: jax.Array  # [max_steps, B] tokens committed by each decode step (0 once done)
  accepted: jax.Array  # [max_steps, B] draft tokens accepted by each step (committed - 1 when active)
  method_state: Any = ()

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def generated(self) -> jax.Array:
    return self.num_tokens - self.prompt_lens


def last_tokens(state: DecodeState) -> jax.Array:
  """[B] the pending token of each row."""
  return jnp.take_along_axis(state.tokens, (state.num_tokens - 1)[:, None], axis=1)[:, 0]


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


def record_step(state: DecodeState, n_B: jax.Array) -> DecodeState:
  """Account one decode forward that committed n[b] tokens per row."""
  s = state.step
  return state.replace(
      committed=state.committed.at[s].set(n_B),
      accepted=state.accepted.at[s].set(jnp.maximum(n_B - 1, 0)),
      step=s + 1,
  )


def commit_chain(state: DecodeState, new_BxM: jax.Array, n_B: jax.Array, eos_ids) -> DecodeState:
  """Shared tail of a step whose accepted tokens are a chain prefix of the forward's input:
  append tokens, keep the first n K/V scratch slots as they are (no data moves), record stats."""
  state, n_B = append_tokens(state, new_BxM, n_B, eos_ids)
  return record_step(state.replace(cache=advance(state.cache, n_B)), n_B)
