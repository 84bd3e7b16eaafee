"""Token Recycling (train-free tree drafter).

An adjacency matrix M[V, k] holds, for every token, the top-k next tokens the target predicted
the last time that token was in a forward. A static template (parent, slot) turns the pending
token into a tree: node token = M[parent token, slot], built one depth per gather. After every
forward, M[token] <- top-k of the logits at every tree node (root included). M starts at zero,
persists across `generate` calls on the same bundle (`bundle.method_memory`), and can be reset.
Verification is the shared one (deterministic drafts), so outputs equal AR.

Pay per draft (`adaptive=True`): template nodes are ordered most probable path first, so each
step verifies the prefix of the template with the best expected tokens/s (acceptance learned
online, forward times measured; jaxspec.methods.draft_sizing) among `prefix_sizes` of it.

Prompt lookup grafted on the tree (`lookup=L`): the template's main path (slot 0 at every depth,
extended to depth L and placed first) carries, where the row's last n tokens (min_ngram <= n <=
max_ngram) occurred before, the L tokens that followed them; the rest of the tree hangs off those tokens
from the matrix as usual. Acceptance is learned per matched n (0: no match, the plain tree), so
a row in repetitive text verifies the long chain and a row elsewhere the recycled tree or
nothing. Drafts stay deterministic: outputs are still AR's.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import draft_sizing, tree_templates
from jaxspec.methods.base import Method
from jaxspec.methods.lookup_graft import check_options, graft, grafted_priors, main_path_lookup, num_contexts
from jaxspec.verify import Draft, TreeSpec

MEMORY_KEY = "recycling_adjacency"


@struct.dataclass
class RecyclingState:
  M_Vxk: jax.Array  # [V, k] int32: the top-k next tokens last predicted after each token
  seen_V: jax.Array  # [V] bool: the token's row was written (drafts from an unwritten row are not drafts)
  sizing: draft_sizing.SizingStats  # learned acceptance scale (used when adaptive)


@dataclasses.dataclass(frozen=True)
class TokenRecycling(draft_sizing.PrefixSizing, Method):
  """`template`: a name ("tiny", "small", "medium", "large", "xl", "xxl"), a node count, or "auto"
  (resolved per bundle by `resolve_auto_template` from measured forward times). `lookup`: length
  of the prompt-lookup chain grafted on the main path (0: none)."""

  template: str | int = "auto"
  k: int = 8
  adaptive: bool = True
  lookup: int = 0
  max_ngram: int = 3  # with lookup: the longest n-gram matched
  min_ngram: int = 1  # with lookup: the shortest n-gram whose continuation replaces the main path
  sizes: tuple[int, ...] | str | None = None  # adaptive: forward sizes, e.g. "1/2/4/7"; None: prefix_sizes
  cost: tuple[float, ...] | None = None  # forward time per prefix size relative to one token; None: measured
  max_loss: float | None = None  # adaptive: bound the time lost to rejected drafts (`auto`: 0.05)
  name = "recycling"

  @property
  def memory_key(self) -> str:
    """The adjacency matrix persists in bundle.method_memory under this key (one per k)."""
    return f"{MEMORY_KEY}_k{self.k}"

  def resolve(self, bundle) -> "TokenRecycling":
    """Concrete template for this bundle ("auto" picks the best expected tokens/s) and, when
    adaptive, the measured forward times of its prefix sizes."""
    m = self
    if m.template == "auto":
      from jaxspec.methods.auto_template import pick_template
      m = dataclasses.replace(m, template=pick_template(bundle, m.k))
    if m.sized and m.cost is None:
      m = dataclasses.replace(m, cost=draft_sizing.measured_cost(bundle, m.forward_sizes))
    return m

  def recall(self, mstate: RecyclingState, memory: RecyclingState) -> RecyclingState:
    """The matrix and the learned acceptance carry over from earlier calls; the loss bound is
    per generation and per row (the batch may differ), so it starts afresh."""
    fresh = mstate.sizing
    return memory.replace(sizing=memory.sizing.replace(ahead_B=fresh.ahead_B, max_loss=fresh.max_loss))

  def observe(self, bundle, mean_accepted: float, steps: int) -> None:
    """Record acceptance seen with this template (feeds template="auto"); not with a grafted
    chain, whose acceptance is not the template's."""
    from jaxspec.methods.auto_template import record_acceptance
    if not self.lookup:
      record_acceptance(bundle, self, mean_accepted, steps)

  def __post_init__(self):
    ok_names = set(tree_templates.TEMPLATE_SIZES) | {"xl", "auto"}
    if not (self.template in ok_names or (isinstance(self.template, int) and self.template >= 1)):
      raise InvalidOptionError(f"recycling template must be one of {sorted(ok_names)} or a node count, "
                               f"got {self.template!r}")
    if not 1 <= self.k <= len(tree_templates.PRIOR_SLOT_ACCEPT):
      raise InvalidOptionError(f"recycling k must be in [1, {len(tree_templates.PRIOR_SLOT_ACCEPT)}]")
    check_options("recycling", self.lookup, self.min_ngram, self.max_ngram)
    draft_sizing.check_max_loss("recycling", self.max_loss)
    self._normalise_sizes()

  @cached_property
  def _template(self):
    if self.template == "auto":
      raise InvalidOptionError("template='auto' must be resolved against a model first (generate does this)")
    prior = tree_templates.PRIOR_SLOT_ACCEPT[: self.k]
    tree, slots = tree_templates.template(self.template, prior)
    return tree_templates.main_chain_first(tree, slots, self.lookup) if self.lookup else (tree, slots)

  @property
  def tree(self) -> TreeSpec:
    return self._template[0]

  @property
  def slots(self) -> np.ndarray:
    return np.asarray(self._template[1], np.int32)

  def node_prior(self) -> list[float]:
    prior = tree_templates.PRIOR_SLOT_ACCEPT
    return [0.0] + [prior[c] for c in self.slots[1:]]

  def context_priors(self) -> list[list[float]]:
    """Context 0: no lookup match (the recycled tree); n >= 1: an n-gram matched, the main path's
    first `lookup` nodes carry its continuation (prior: prompt lookup's measured acceptance for
    that n). Contexts below min_ngram are never used."""
    if not self.lookup:
      return [self.node_prior()]
    return grafted_priors(self.node_prior(), self.lookup, self.max_ngram)

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    contexts = num_contexts(self.lookup, self.max_ngram)
    return RecyclingState(M_Vxk=jnp.zeros((config.vocab_size, self.k), jnp.int32),
                          seen_V=jnp.zeros((config.vocab_size,), bool),
                          sizing=draft_sizing.init_stats(contexts, batch_size, self.max_loss))

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    ms: RecyclingState = state.method_state
    B, T = state.batch_size, self.tree.size
    toks = jnp.zeros((B, T), jnp.int32).at[:, 0].set(last_tokens(state))
    keep = (jnp.arange(T) == 0)[None, :] & jnp.ones((B, 1), bool)  # the root
    context_B = None
    if self.lookup:  # nodes 1..lookup are the main path (main_chain_first): lookup tokens where found
      cont_BxL, found_BxL, context_B = main_path_lookup(state, self.lookup, self.max_ngram, self.min_ngram)
      toks, _, grafted = graft(toks, keep, cont_BxL, found_BxL)
      keep = keep | grafted
    toks, valid = fill_from_matrix(toks, jnp.ones((B, T), bool), keep, ms.M_Vxk, ms.seen_V, self.tree, self.slots, 1)
    valid = self.limit(valid, ms.sizing, context_B)
    return Draft(tokens=toks, valid=valid, context=context_B), state.method_state

  def update(self, mstate: RecyclingState, state, draft: Draft, logits_BxTxV, hidden, verdict, n_B):
    M_Vxk, seen_V = recycle(mstate.M_Vxk, mstate.seen_V, draft, logits_BxTxV, self.forward_sizes)
    return RecyclingState(M_Vxk=M_Vxk, seen_V=seen_V, sizing=self.observe_step(mstate.sizing, draft, verdict, n_B))


def recycle(M_Vxk, seen_V, draft: Draft, logits_BxTxV, sizes: tuple[int, ...], P_Vxk=None):
  """(M, seen) after a verified step: M[token] <- top-k of the logits at every verified node.
  `sizes`: the method's forward sizes, the last its tree's node count T. The top-k ranks only the
  rows of the size the step ran (the smallest holding its valid nodes; 1 when it verified no
  draft): rows past it were not computed, and their nodes are invalid, so their M rows stay.
  At 17 rows of a 49k vocabulary the top-k is ~0.9 ms on this CPU (experiments/LOG.md, session 14).
  With `P_Vxk` ([V, k] float32) also the candidates' probabilities: (M, seen, P)."""
  V, k = M_Vxk.shape
  B, T = logits_BxTxV.shape[0], sizes[-1]
  with_probs = P_Vxk is not None

  def top(n):  # [B, T, k]: the first n rows ranked, zeros after (and their probabilities)
    rows = logits_BxTxV[:, :n].astype(jnp.float32)
    val, idx = jax.lax.top_k(rows, k)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, T - n), (0, 0)])
    if not with_probs:
      return pad(idx.astype(jnp.int32))
    return pad(idx.astype(jnp.int32)), pad(jnp.exp(val - jax.nn.logsumexp(rows, axis=-1, keepdims=True)))

  sizes = tuple(sorted({1, *sizes}))
  branch = draft_sizing.size_index(sizes, draft.valid[:, :T])
  out = top(T) if T == 1 else jax.lax.switch(branch, [partial(top, n) for n in sizes])
  top_BxTxk = out[0] if with_probs else out
  rows = jnp.where(draft.valid[:, :T], draft.tokens[:, :T], V).reshape(-1)  # V: out of range, dropped
  M_Vxk = M_Vxk.at[rows].set(top_BxTxk.reshape(-1, k), mode="drop")
  seen_V = seen_V.at[rows].set(True, mode="drop")
  if not with_probs:
    return M_Vxk, seen_V
  return M_Vxk, seen_V, P_Vxk.at[rows].set(out[1].reshape(-1, k), mode="drop")


def fill_from_matrix(tokens_BxT, valid_BxT, keep_BxT, M_Vxk, seen_V, tree: TreeSpec, slots, from_depth: int):
  """(tokens, valid) with every node at depth >= from_depth not in `keep` drawn from the matrix:
  candidate slots[i] of its parent's token, one depth at a time (a child reads the token its parent
  got). A node stays valid only under a valid parent and, when drawn, where the parent's row was
  ever written; kept nodes (the root, grafted tokens) keep their token."""
  parents, slots, depth = np.asarray(tree.parents), np.maximum(np.asarray(slots), 0), tree.depth
  for d in range(from_depth, tree.max_depth + 1):
    nodes = np.nonzero(depth == d)[0]
    parent_tok = tokens_BxT[:, parents[nodes]]  # [B, n_d]
    keep = keep_BxT[:, nodes]
    tokens_BxT = tokens_BxT.at[:, nodes].set(jnp.where(keep, tokens_BxT[:, nodes], M_Vxk[parent_tok, slots[nodes]]))
    ok = valid_BxT[:, nodes] & valid_BxT[:, parents[nodes]] & (keep | seen_V[parent_tok])
    valid_BxT = valid_BxT.at[:, nodes].set(ok)
  return tokens_BxT, valid_BxT
