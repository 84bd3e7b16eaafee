"""Token Recycling (train-free tree drafter).

An adjacency matrix M[V, k] holds, for every token, the top-k next tokens the target predicted
the last time that token was in a forward. A static template (parent, slot) turns the pending
token into a tree: node token = M[parent token, slot], built one depth per gather. After every
forward, M[token] <- top-k of the logits at every tree node (root included). M starts at zero,
persists across `generate` calls on the same bundle (`bundle.method_memory`), and can be reset.
Verification is the shared one (deterministic drafts), so outputs equal AR.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import tree_templates
from jaxspec.methods.base import Method
from jaxspec.verify import Draft, TreeSpec

MEMORY_KEY = "recycling_adjacency"


@dataclasses.dataclass(frozen=True)
class TokenRecycling(Method):
  """`template`: a name ("tiny", "small", "medium", "large", "xl", "xxl"), a node count, or "auto"
  (resolved per bundle by `resolve_auto_template` from measured forward times)."""

  template: str | int = "auto"
  k: int = 8
  name = "recycling"
  memory_key = MEMORY_KEY  # the adjacency matrix persists in bundle.method_memory under this key

  def resolve(self, bundle) -> "TokenRecycling":
    """Concrete template for this bundle: "auto" picks the best expected tokens/s."""
    if self.template != "auto":
      return self
    from jaxspec.methods.auto_template import pick_template
    return dataclasses.replace(self, template=pick_template(bundle, self.k))

  def observe(self, bundle, mean_accepted: float, steps: int) -> None:
    """Record acceptance seen with this template (feeds template="auto")."""
    from jaxspec.methods.auto_template import record_acceptance
    record_acceptance(bundle, self, mean_accepted, steps)

  def __post_init__(self):
    ok_names = set(tree_templates.TEMPLATE_SIZES) | {"xl", "auto"}
    if not (self.template in ok_names or (isinstance(self.template, int) and self.template >= 1)):
      raise InvalidOptionError(f"recycling template must be one of {sorted(ok_names)} or a node count, "
                               f"got {self.template!r}")
    if not 1 <= self.k <= len(tree_templates.PRIOR_SLOT_ACCEPT):
      raise InvalidOptionError(f"recycling k must be in [1, {len(tree_templates.PRIOR_SLOT_ACCEPT)}]")

  @cached_property
  def _template(self):
    if self.template == "auto":
      raise InvalidOptionError("template='auto' must be resolved against a model first (generate does this)")
    prior = tree_templates.PRIOR_SLOT_ACCEPT[: self.k]
    return tree_templates.template(self.template, prior)

  @property
  def tree(self) -> TreeSpec:
    return self._template[0]

  @property
  def slots(self) -> np.ndarray:
    return np.asarray(self._template[1], np.int32)

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    return jnp.zeros((config.vocab_size, self.k), jnp.int32)

  def propose(self, model, mparams, state: DecodeState, sampling, key):
    M_Vxk = state.method_state
    tree = self.tree
    parents, slots, depth = np.asarray(tree.parents), self.slots, tree.depth
    B = state.batch_size
    toks = jnp.zeros((B, tree.size), jnp.int32).at[:, 0].set(last_tokens(state))
    for d in range(1, tree.max_depth + 1):
      nodes = np.nonzero(depth == d)[0]
      parent_tok = toks[:, parents[nodes]]  # [B, n_d]
      toks = toks.at[:, nodes].set(M_Vxk[parent_tok, slots[nodes]])
    return Draft(tokens=toks, valid=jnp.ones((B, tree.size), bool)), M_Vxk

  def update(self, M_Vxk, state, draft: Draft, logits_BxTxV, hidden, verdict, n_B):
    T = self.tree.size
    top_BxTxk = jax.lax.top_k(logits_BxTxV[:, :T], self.k)[1].astype(jnp.int32)
    return M_Vxk.at[draft.tokens[:, :T].reshape(-1)].set(top_BxTxk.reshape(-1, self.k))
