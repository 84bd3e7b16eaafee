"""A prompt-lookup chain grafted on a draft tree's main path (Token Recycling, hidden transfer).

The tree is ordered main path first (`tree_templates.main_chain_first`): nodes 1..L are slot 0 at
depths 1..L. Where a row's last n tokens (min_ngram <= n <= max_ngram) occurred before, those
nodes carry the L tokens that followed the latest occurrence, in place of the drafter's own; the
rest of the tree hangs off them as usual. The row's draft context is the matched n (0: no
match, the drafter's own tree), and pay per draft learns acceptance per context, starting from
prompt lookup's measured acceptance for that n. Drafts stay deterministic: outputs are the
verifier's.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxspec.decode_state import DecodeState
from jaxspec.errors import InvalidOptionError
from jaxspec.methods.prompt_lookup import lookup_continuation, prior_accept


def check_options(method: str, lookup: int, min_ngram: int, max_ngram: int) -> None:
  """A clear error for a graft that cannot exist."""
  if lookup < 0 or not 1 <= min_ngram <= max_ngram:
    raise InvalidOptionError(f"{method} needs lookup >= 0 and 1 <= min_ngram <= max_ngram, got lookup={lookup}, "
                             f"min_ngram={min_ngram}, max_ngram={max_ngram}")


def num_contexts(lookup: int, max_ngram: int) -> int:
  """Draft contexts the sizing learns apart: 0 (no match) and, with a graft, each matched n."""
  return 1 + (max_ngram if lookup else 0)


def main_path_lookup(state: DecodeState, length: int, max_ngram: int, min_ngram: int):
  """(cont [B, L] int32, found [B, L] bool, context [B] int32): the continuation for main-path
  nodes 1..L, where each is grafted (a chain: it stops at the first gap), and the matched n."""
  cont_BxL, found_BxL, context_B = lookup_continuation(state.tokens, state.num_tokens, length, max_ngram, min_ngram)
  return cont_BxL, jnp.cumprod(found_BxL.astype(jnp.int32), axis=1).astype(bool), context_B


def graft(tokens_BxT, ok_BxT, cont_BxL, found_BxL):
  """Main-path nodes 1..L take the lookup tokens where found: (tokens, ok, grafted [B, T] bool)."""
  B, T = tokens_BxT.shape
  L = cont_BxL.shape[1]
  pad = jnp.zeros((B, T - 1 - L), bool)
  grafted_BxT = jnp.concatenate([jnp.zeros((B, 1), bool), found_BxL, pad], axis=1)
  cont_BxT = jnp.concatenate([tokens_BxT[:, :1], cont_BxL, jnp.zeros((B, T - 1 - L), tokens_BxT.dtype)], axis=1)
  return jnp.where(grafted_BxT, cont_BxT, tokens_BxT), ok_BxT | grafted_BxT, grafted_BxT


def grafted_priors(node_prior: list[float], length: int, max_ngram: int) -> list[list[float]]:
  """Per draft context, each node's prior acceptance given its parent's: context 0 the drafter's
  own (`node_prior`), context n its main path 1..L at prompt lookup's prior for an n-gram match."""
  priors = [list(node_prior)]
  for n in range(1, max_ngram + 1):
    chain = list(node_prior)
    chain[1 : length + 1] = prior_accept(n, length)
    priors.append(chain)
  return priors
