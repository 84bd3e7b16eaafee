"""The generic speculative step: propose -> forward -> verify -> commit -> update.

A speculative method is a frozen dataclass deriving from `SpeculativeMethod` that defines
`tree` (static TreeSpec of the verified draft), `propose` and optionally `update`. The forward
may carry extra tokens after the tree (e.g. a lookahead window): set `forward_depth` and
`forward_mask` for all of them; verification only looks at the first `tree.size` tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decode_state import DecodeState, append_tokens, record_step
from jaxspec.models.kv_cache import advance, commit
from jaxspec.sampling import SamplingConfig
from jaxspec.verify import Draft, TreeSpec, Verdict, verify


class SpeculativeMethod:
  """Mixin for frozen-dataclass methods. Subclasses set `name` and implement `tree`, `propose`."""

  name = "speculative"
  without_replacement = False  # drafts drawn without replacement (Gumbel-top-k)
  capture: tuple[int, ...] = ()  # hidden layers the method's update needs

  @property
  def tree(self) -> TreeSpec:
    raise NotImplementedError

  @property
  def forward_depth(self) -> np.ndarray:
    """[T] position offset of each forward token after the pending token's position."""
    return self.tree.depth

  @property
  def forward_mask(self) -> np.ndarray:
    """[T, T] which forward tokens each forward token attends to."""
    return self.tree.mask

  @property
  def scratch_tokens(self) -> int:
    return int(self.forward_depth.shape[0])

  @property
  def max_commit(self) -> int:
    return self.tree.max_depth + 1

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype):
    """Method state carried in DecodeState.method_state (any pytree)."""
    return ()

  def propose(self, model, state: DecodeState, sampling: SamplingConfig, key, aux=None) -> Draft:
    """The draft for this step (or (draft, new method state)). `aux` is the auxiliary (draft)
    model, if the method has one."""
    raise NotImplementedError

  def verify_draft(self, draft: Draft, logits_BxTxV, sampling: SamplingConfig, key) -> Verdict:
    """Accept drafted tokens of the first `tree.size` forward tokens. The shared verifier; a
    method overrides this only to change the rule (e.g. a trie over duplicate candidates)."""
    return verify(self.tree, draft, logits_BxTxV, sampling, key, self.without_replacement)

  def update(self, method_state, state: DecodeState, draft: Draft, logits_BxTxV, hidden, verdict: Verdict, n_B):
    """New method state after the verified step. `state` already holds the committed tokens;
    n_B is what each row actually committed (the verdict cut at EOS / budget)."""
    return method_state

  def step(self, model, state: DecodeState, sampling: SamplingConfig, eos_ids, attn_impl="auto",
           aux=None) -> DecodeState:
    return speculative_step(self, model, state, sampling, eos_ids, attn_impl, aux)


def speculative_step(method: SpeculativeMethod, model, state: DecodeState, sampling: SamplingConfig, eos_ids,
                     attn_impl: str = "auto", aux=None) -> DecodeState:
  """One target forward over the draft; commits the verified tokens (>= 1 per active row)."""
  key, k_prop, k_ver = jax.random.split(state.key, 3)
  draft = method.propose(model, state, sampling, k_prop, aux)
  if isinstance(draft, tuple):  # (draft, method state after drafting), e.g. a drafter's cache
    draft, method_state = draft
    state = state.replace(method_state=method_state)
  depth_T = jnp.asarray(method.forward_depth, jnp.int32)
  positions_BxT = state.cache.lengths[:, None] + depth_T[None, :]
  logits_BxTxV, hidden, cache = model(state.cache, draft.tokens, positions_BxT, jnp.asarray(method.forward_mask),
                                      capture=method.capture, attn_impl=attn_impl)
  tree = method.tree
  verdict = method.verify_draft(draft, logits_BxTxV, sampling, k_ver)
  st, n_B = append_tokens(state.replace(key=key), verdict.tokens, verdict.n, eos_ids)
  # K/V to keep: the accepted path (root first). A chain's path is its own prefix: nothing moves.
  cache = advance(cache, n_B) if tree.is_chain else commit(cache, verdict.path, n_B)
  method_state = method.update(st.method_state, st, draft, logits_BxTxV, hidden, verdict, n_B)
  return record_step(st.replace(cache=cache, method_state=method_state), n_B)
