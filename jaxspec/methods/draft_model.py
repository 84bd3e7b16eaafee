"""Draft-model speculation (SpS): a smaller model drafts, the target verifies in one forward.

* `drafter="self"`: early exit. The target's first `exit_layer` blocks + final norm + LM head
  draft. Their K/V for committed tokens are exactly the target's, so the drafter reads and
  writes the target cache (scratch slots, overwritten by the verification forward): no second
  cache, no second model.
* `drafter=<name or folder>`: a separate model with the same tokenizer. Its weights are the
  method's own parameters (`load_params`, sharded like the target's), its graph is resolved onto
  the method (`resolve`), its cache lives in the method state (kept in step with the target by
  committing the same accepted path). Loaded once per target bundle (`bundle.method_memory`).

Shapes: `width` = 1 drafts a chain of `k` tokens; `width` > 1 a full tree of depth `k` with
`width` children per node (top-w when greedy; with sampling, i.i.d. draws from the drafter's q
or, with `without_replacement`, Gumbel-top-w). Verification is the shared lossless one.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import InvalidOptionError
from flax import nnx

from jaxspec.methods.base import Method
from jaxspec.models.kv_cache import KVCache, advance, commit, init_cache
from jaxspec.sampling import SamplingConfig, target_logprobs
from jaxspec.verify import Draft, TreeSpec

DRAFTERS_KEY = "drafters"  # bundle.method_memory[DRAFTERS_KEY][(name, dtype)] = loaded drafter bundle


def register_drafter(target, name: str, drafter) -> None:
  """Make `drafter` (a ModelBundle) the model `drafter=name` loads for `target`, without a folder."""
  target.method_memory.setdefault(DRAFTERS_KEY, {})[(name, str(target.dtype))] = drafter


def drafter_bundle(target, name: str):
  """The drafter `name` for `target`: loaded once per target bundle, checked to share its vocabulary."""
  loaded = target.method_memory.setdefault(DRAFTERS_KEY, {})
  key = (name, str(target.dtype))
  if key not in loaded:
    from jaxspec.models.bundle import load_model
    loaded[key] = load_model(name, dtype=target.dtype, progress=False)
  aux = loaded[key]
  if aux.tokenizer.get_vocab() != target.tokenizer.get_vocab():
    raise InvalidOptionError(f"drafter {name!r} has a different tokenizer from {target.name!r}; "
                             "a draft model must share the target's vocabulary")
  if aux.config.vocab_size != target.config.vocab_size:
    raise InvalidOptionError(f"drafter vocab {aux.config.vocab_size} != target vocab {target.config.vocab_size}")
  return aux


def full_tree(width: int, depth: int) -> TreeSpec:
  """Root + every node having `width` children, down to `depth` (BFS order)."""
  parents, frontier = [-1], [0]
  for _ in range(depth):
    nxt = []
    for p in frontier:
      for _ in range(width):
        parents.append(p)
        nxt.append(len(parents) - 1)
    frontier = nxt
  return TreeSpec(tuple(parents))


def _children_tokens(logp_BxNxV, width: int, key, sampling: SamplingConfig, without_replacement: bool):
  """[B, N, width] child tokens for N frontier nodes from the drafter's log q."""
  if sampling.greedy:
    return jax.lax.top_k(logp_BxNxV, width)[1].astype(jnp.int32)
  if without_replacement:  # Gumbel-top-k: `width` distinct draws, in draw order
    g = jax.random.gumbel(key, logp_BxNxV.shape)
    return jax.lax.top_k(jnp.where(jnp.isfinite(logp_BxNxV), logp_BxNxV + g, -jnp.inf), width)[1].astype(jnp.int32)
  B, N, V = logp_BxNxV.shape
  draws = jax.random.categorical(key, logp_BxNxV[:, :, None, :], axis=-1, shape=(B, N, width))
  return draws.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DraftModelSpeculation(Method):
  """k: draft depth; width: children per node (1 = chain); drafter: "self" or a model name/path;
  exit_layer: blocks the self-drafter uses (0 = a quarter of the target's). `drafter_graphdef`
  and `drafter_config` are set by `resolve` for a separate drafter."""

  k: int = 4
  width: int = 1
  drafter: str = "self"
  exit_layer: int = 0
  without_replacement: bool = False
  drafter_graphdef: Any = dataclasses.field(default=None, repr=False)
  drafter_config: Any = dataclasses.field(default=None, repr=False)
  name = "draft"
  has_prefill = True  # a separate drafter reads the prompt into its own cache

  def __post_init__(self):
    if self.k < 1 or self.width < 1 or self.exit_layer < 0:
      raise InvalidOptionError(f"draft needs k >= 1, width >= 1, exit_layer >= 0; got {self}")
    if self.width ** self.k > 4096:
      raise InvalidOptionError(f"draft tree width**k = {self.width ** self.k} nodes at the last depth is too big")

  @cached_property
  def _tree(self) -> TreeSpec:
    return TreeSpec.chain(self.k) if self.width == 1 else full_tree(self.width, self.k)

  @property
  def tree(self) -> TreeSpec:
    return self._tree

  @property
  def is_self(self) -> bool:
    return self.drafter == "self"

  # ---- setup hooks -----------------------------------------------------------------------

  def resolve(self, bundle) -> "DraftModelSpeculation":
    if self.is_self:
      L = bundle.config.num_layers
      layer = self.exit_layer or max(1, L // 4)
      if layer >= L:
        raise InvalidOptionError(f"exit_layer {layer} must be < the target's {L} layers")
      return dataclasses.replace(self, exit_layer=layer)
    aux = drafter_bundle(bundle, self.drafter)  # load (once) and check before any state is built
    return dataclasses.replace(self, drafter_graphdef=aux.graphdef, drafter_config=aux.config)

  def load_params(self, bundle):
    return None if self.is_self else drafter_bundle(bundle, self.drafter).params

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    if self.is_self:
      return ()
    return init_cache(self.drafter_config, batch_size, num_slots, dtype)

  def _drafter(self, mparams):
    return nnx.merge(self.drafter_graphdef, mparams)

  def prefill(self, model, mparams, state: DecodeState, prompt_len: int, attn_impl, hidden):
    """The separate drafter reads the prompt into its own cache."""
    if self.is_self:
      return state.method_state
    B = state.batch_size
    prompt = state.tokens[:, :prompt_len]
    pos = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (B, prompt_len))
    _, _, cache = self._drafter(mparams)(state.method_state, prompt, pos,
                                         jnp.tril(jnp.ones((prompt_len, prompt_len), bool)),
                                         logits_index_BxN=jnp.zeros((B, 1), jnp.int32), attn_impl=attn_impl)
    return advance(cache, state.prompt_lens)

  # ---- drafting --------------------------------------------------------------------------

  def _draft_forward(self, model, aux, cache: KVCache, tokens_BxT, positions_BxT, mask_TxT, attn_impl):
    """Drafter logits [B, T, V] and the cache with the drafted tokens' K/V in its scratch."""
    if self.is_self:
      return model(cache, tokens_BxT, positions_BxT, mask_TxT, num_layers=self.exit_layer, attn_impl=attn_impl)[::2]
    logits, _, cache = aux(cache, tokens_BxT, positions_BxT, mask_TxT, attn_impl=attn_impl)
    return logits, cache

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    aux = None if self.is_self else self._drafter(mparams)
    tree = self.tree
    B, T = state.batch_size, tree.size
    cache = state.cache if self.is_self else state.method_state
    depth = tree.depth
    parents = np.asarray(tree.parents)
    tokens = jnp.zeros((B, T), jnp.int32).at[:, 0].set(last_tokens(state))
    V = (model if self.is_self else aux).config.vocab_size
    q_BxTxV = jnp.zeros((B, T, V), jnp.float32) if not sampling.greedy else None
    keys = jax.random.split(key, tree.max_depth)
    base = cache.lengths
    for d in range(tree.max_depth):
      frontier = np.nonzero(depth == d)[0]
      if self.width == 1:  # chain: feed only the newest token, writing its own scratch slot d
        step_cache = cache.replace(lengths=base + d)
        logits, cache = self._draft_forward(model, aux, step_cache, tokens[:, d:d + 1], (base + d)[:, None],
                                            jnp.ones((1, 1), bool), attn_impl)
        cache = cache.replace(lengths=base)
        logits_f = logits  # [B, 1, V]
      else:  # tree: re-run every node up to this depth under the tree mask
        n = int(frontier.max()) + 1
        sub_mask = jnp.asarray(tree.mask[:n, :n])
        logits, cache = self._draft_forward(model, aux, cache, tokens[:, :n], base[:, None] + jnp.asarray(depth[:n]),
                                            sub_mask, attn_impl)
        logits_f = logits[:, frontier]
      logq = target_logprobs(logits_f, sampling if not sampling.greedy else SamplingConfig(1.0))
      kids = _children_tokens(logq, self.width, keys[d], sampling, self.without_replacement)  # [B, F, w]
      child_ids = np.asarray([[c for c in range(T) if parents[c] == f] for f in frontier])  # [F, w]
      tokens = tokens.at[:, child_ids.reshape(-1)].set(kids.reshape(B, -1))
      if q_BxTxV is not None:
        q = jnp.exp(logq)  # [B, F, V]
        q_BxTxV = q_BxTxV.at[:, child_ids.reshape(-1)].set(jnp.repeat(q, self.width, axis=1))
    if not self.is_self:
      # The last drafted tokens were never fed: feed them so the drafter cache holds every node's K/V.
      logits, cache = self._draft_forward(model, aux, cache, tokens, base[:, None] + jnp.asarray(depth),
                                          jnp.asarray(tree.mask), attn_impl)
    draft = Draft(tokens=tokens, valid=jnp.ones((B, T), bool), q_probs=q_BxTxV)
    # self-draft scratch writes are overwritten by the verification forward: nothing to keep
    return draft, (state.method_state if self.is_self else cache)

  def update(self, method_state, state, draft, logits_BxTxV, hidden, verdict, n_B):
    """Keep the drafter's K/V of the accepted path, like the target's."""
    if self.is_self:
      return method_state
    return advance(method_state, n_B) if self.tree.is_chain else commit(method_state, verdict.path, n_B)
