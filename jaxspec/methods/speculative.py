"""The one decode step every method runs: propose -> forward -> verify -> commit -> update.

The method supplies the draft, its forward layout (`forward_depth`, `forward_mask`: the
verified tree first, then any extra tokens such as a lookahead window), the verification rule
and the state update (see `jaxspec.methods.base.Method`); everything else is shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.decode_state import DecodeState, append_tokens, record_step
from jaxspec.models.kv_cache import advance, commit
from jaxspec.sampling import SamplingConfig


def speculative_step(method, model, mparams, state: DecodeState, sampling: SamplingConfig, eos_ids,
                     attn_impl: str = "auto") -> DecodeState:
  """One target forward over the draft; commits the verified tokens (>= 1 per active row)."""
  key, k_prop, k_ver = jax.random.split(state.key, 3)
  draft, method_state = method.propose(model, mparams, state, sampling, k_prop)
  state = state.replace(method_state=method_state)
  depth_T = jnp.asarray(method.forward_depth, jnp.int32)
  positions_BxT = state.cache.lengths[:, None] + depth_T[None, :]
  logits_BxTxV, hidden, cache = model(state.cache, draft.tokens, positions_BxT, jnp.asarray(method.forward_mask),
                                      capture=method.capture, attn_impl=attn_impl)
  verdict = method.verify(draft, logits_BxTxV, sampling, k_ver)
  st, n_B = append_tokens(state.replace(key=key), verdict.tokens, verdict.n, eos_ids)
  # K/V to keep: the accepted path (root first). A chain's path is its own prefix: nothing moves.
  cache = advance(cache, n_B) if method.tree.is_chain else commit(cache, verdict.path, n_B)
  method_state = method.update(st.method_state, st, draft, logits_BxTxV, hidden, verdict, n_B)
  return record_step(st.replace(cache=cache, method_state=method_state), n_B)
