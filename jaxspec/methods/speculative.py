"""The one decode step every method runs: propose -> forward -> verify -> commit -> update.

The method supplies the draft, its forward layout (`forward_depth`, `forward_mask`: the
verified tree first, then any extra tokens such as a lookahead window), the verification rule
and the state update (see `jaxspec.methods.base.Method`); everything else is shared. A draft
that carries its own trees (`Draft.parents`: each row's tree chosen this step, e.g. by draft
confidence) gets positions and a [B, T, T] mask from them instead of the static layout.

Pay per draft: a method with several `forward_sizes` runs, each step, the smallest forward
prefix that holds every row's valid draft nodes (one `lax.switch`, every branch compiled once;
the rows of a batch share the step's size). Nodes past it are invalid, so they are never
accepted and their logits (zeros) are never read. Work per forward token that the verifier
needs (the greedy argmax, or the target distribution when sampling) is done inside the branch on
its rows only: a step that drafts nothing then costs about what an AR step does, whatever the
method's largest layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxspec.decode_state import DecodeState, append_tokens, record_step
from jaxspec.methods.draft_sizing import size_index
from jaxspec.models.kv_cache import advance, commit, write_new
from jaxspec.sampling import SamplingConfig
from jaxspec.verify import target_rows, tree_structure


def _forward(method, model, attn_impl, sampling: SamplingConfig, size: int, cache, tokens_BxT, positions_BxT,
             mask_BxTxT=None):
  """The forward over the first `size` tokens: logits, their `TargetRows` (argmax or p), captures
  and the new tokens' K/V, all zero-padded back to T (`mask_BxTxT`: per-row trees; None: the
  method's static layout). The target rows are computed here, over `size` rows: after the switch
  the argmax ran over all T rows (1.3 ms at T=17 on a 49k vocabulary, ~4% of a SmolLM2 step on
  this CPU), and p too (experiments/LOG.md, session 14). The cache is only read:
  under `lax.switch`, XLA CPU updated a cache passed through the conditional in place in the first
  branch only and copied it in the others."""
  T = tokens_BxT.shape[1]
  mask = jnp.asarray(method.forward_mask[:size, :size]) if mask_BxTxT is None else mask_BxTxT[:, :size, :size]
  logits, hidden, new_kv = model(cache, tokens_BxT[:, :size], positions_BxT[:, :size], mask,
                                 capture=method.capture, attn_impl=attn_impl, write_cache=False)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, T - size)] + [(0, 0)] * (x.ndim - 2))
  pad_slots = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, 0), (0, T - size), (0, 0)])
  new_kv = new_kv.replace(k=tuple(map(pad_slots, new_kv.k)), v=tuple(map(pad_slots, new_kv.v)))
  target = jax.tree.map(pad, target_rows(logits, sampling))
  return pad(logits), target, {i: pad(h) for i, h in hidden.items()}, new_kv


def speculative_step(method, model, mparams, state: DecodeState, sampling: SamplingConfig, eos_ids,
                     attn_impl: str = "auto") -> DecodeState:
  """One target forward over the draft; commits the verified tokens (>= 1 per active row)."""
  key, k_prop, k_ver = jax.random.split(state.key, 3)
  draft, method_state = method.propose(model, mparams, state, sampling, k_prop, attn_impl)
  state = state.replace(method_state=method_state)
  if draft.parents is None:  # the method's static layout
    depth_BxT, mask_BxTxT = jnp.asarray(method.forward_depth, jnp.int32)[None, :], None
  else:  # each row's own tree this step (XLA attention: the Pallas kernels take one mask)
    depth_BxT, mask_BxTxT = tree_structure(draft.parents, method.tree.max_depth)
  positions_BxT = state.cache.lengths[:, None] + depth_BxT
  sizes = method.forward_sizes
  operands = (state.cache, draft.tokens, positions_BxT, mask_BxTxT)
  forward = functools.partial(_forward, method, model, attn_impl, sampling)
  if len(sizes) == 1:
    size = jnp.asarray(sizes[0], jnp.int32)
    logits_BxTxV, target, hidden, new_kv = forward(sizes[0], *operands)
  else:
    branch = size_index(sizes, draft.valid)
    size = jnp.asarray(sizes, jnp.int32)[branch]
    branches = [functools.partial(forward, n) for n in sizes]
    logits_BxTxV, target, hidden, new_kv = jax.lax.switch(branch, branches, *operands)
  cache = write_new(state.cache, new_kv)  # T slots: those past the step's size hold zeros, never read
  verdict = method.verify(draft, logits_BxTxV, sampling, k_ver, target)
  st, n_B = append_tokens(state.replace(key=key), verdict.tokens, verdict.n, eos_ids)
  # K/V to keep: the accepted path (root first). A chain's path is its own prefix: nothing moves.
  # A verdict may keep fewer slots than it commits (LUD: tokens read off placeholders have no
  # K/V of their own; they stay pending and the next forward feeds them).
  keep_B = n_B if verdict.keep is None else jnp.where(n_B > 0, verdict.keep, 0)
  cache = advance(cache, keep_B) if method.tree.is_chain else commit(cache, verdict.path, keep_B)
  method_state = method.update(st.method_state, st, draft, logits_BxTxV, hidden, verdict, n_B)
  return record_step(st.replace(cache=cache, method_state=method_state), n_B, size)
