"""Autoregressive decoding: one token per forward. The baseline every method must match."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.decode_state import DecodeState, commit_chain, last_tokens
from jaxspec.sampling import SamplingConfig, sample_tokens


@dataclasses.dataclass(frozen=True)
class AR:
  """Plain AR decoding. Greedy or sampled with the shared SamplingConfig."""

  name = "ar"
  scratch_tokens = 1  # T: tokens per forward
  max_commit = 1  # most tokens one step can commit

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype):
    return ()

  def step(self, model, state: DecodeState, sampling: SamplingConfig, eos_ids, attn_impl="auto",
           aux=None) -> DecodeState:
    """Feed the pending token, sample the next. Commit moves no cache data."""
    B = state.batch_size
    logits_Bx1xV, _, cache = model(
        state.cache, last_tokens(state)[:, None], state.cache.lengths[:, None],
        jnp.ones((1, 1), bool), attn_impl=attn_impl)
    key, sub = jax.random.split(state.key)
    next_B = sample_tokens(logits_Bx1xV[:, 0], sub, sampling)
    return commit_chain(state.replace(cache=cache, key=key), next_B[:, None],
                        jnp.ones((B,), jnp.int32), eos_ids)
