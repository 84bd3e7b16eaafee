"""Prompt lookup decoding (PLD): draft the tokens that followed the latest earlier occurrence of
the last n tokens (n from max_ngram down to min_ngram) in prompt + output. Lossless: drafts are
deterministic and verified by the shared verifier."""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax.numpy as jnp
import numpy as np

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import draft_sizing
from jaxspec.methods.base import Method
from jaxspec.verify import Draft, TreeSpec


def lookup_continuation(tokens_BxN, num_B, k: int, max_ngram: int, min_ngram: int):
  """For each row, the k tokens after the most recent earlier match of its last n tokens.

  Returns (draft [B, k] int32, valid [B, k] bool, matched n [B] int32: 0 = no match). Longer
  n-grams win; no match -> all invalid.
  """
  B, N = tokens_BxN.shape
  j_N = jnp.arange(N, dtype=jnp.int32)
  best_start = jnp.full((B,), -1, jnp.int32)  # index of the first continuation token
  best_n = jnp.zeros((B,), jnp.int32)
  for n in range(max_ngram, min_ngram - 1, -1):
    match_BxN = jnp.ones((B, N), bool)
    for i in range(n):
      tail_i = jnp.take_along_axis(tokens_BxN, jnp.maximum(num_B - n + i, 0)[:, None], axis=1)  # [B, 1]
      shifted = jnp.roll(tokens_BxN, -i, axis=1)  # shifted[:, j] = tokens[:, j + i]
      match_BxN &= shifted == tail_i
    # window j..j+n-1 must end before the tail starts being the tail itself, continuation j+n < num
    ok_BxN = match_BxN & (j_N[None, :] + n < num_B[:, None]) & (num_B[:, None] >= n + 1)
    start_B = jnp.max(jnp.where(ok_BxN, j_N[None, :] + n, -1), axis=1)
    take = (best_start < 0) & (start_B >= 0)
    best_start = jnp.where(take, start_B, best_start)
    best_n = jnp.where(take, n, best_n)
  idx_Bxk = best_start[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
  draft = jnp.take_along_axis(tokens_BxN, jnp.clip(idx_Bxk, 0, N - 1), axis=1)
  valid = (best_start[:, None] >= 0) & (idx_Bxk < num_B[:, None])
  return draft.astype(jnp.int32), valid, best_n


# Before any draft is seen: P(depth d accepted | depth d - 1 accepted) for a continuation found by
# matching the last n tokens, d = 1..8 (deeper: the last value; n > 3: n = 3's). Measured from
# greedy text alone on the distillation prompts, never the bench's (experiments/lookup_accept.py,
# results/lookup_accept.json; SmolLM2-135M, 354 sequences x 128 tokens). A 1-token match is
# right a quarter of the time at depth 1, a 3-token match four times in five.
PRIOR_ACCEPT_BY_NGRAM = {
    1: (0.24, 0.53, 0.65, 0.68, 0.78, 0.76, 0.81, 0.81),
    2: (0.48, 0.65, 0.72, 0.80, 0.79, 0.83, 0.84, 0.86),
    3: (0.80, 0.83, 0.86, 0.89, 0.90, 0.87, 0.91, 0.92),
}


def prior_accept(n: int, depth: int) -> list[float]:
  """Prior acceptance of the first `depth` tokens of an n-gram-matched continuation, each given
  the one before it was accepted (n = 0, no match: zeros)."""
  if n <= 0:
    return [0.0] * depth
  table = PRIOR_ACCEPT_BY_NGRAM[min(n, max(PRIOR_ACCEPT_BY_NGRAM))]
  return [table[min(d, len(table) - 1)] for d in range(depth)]


@dataclasses.dataclass(frozen=True)
class PromptLookup(Method):
  """Chain draft of up to `k` tokens from n-gram lookup in the row's own prompt + output.

  Pay per draft (`adaptive=True`, the default): each step verifies the prefix, among `sizes`
  (forward sizes, 1 = pending token only), with the best expected tokens/s
  (jaxspec.methods.draft_sizing: acceptance learned during the generation, the device's
  measured forward times `cost`, resolved per model); a row with no match needs a 1-token
  forward. `max_loss`: a draft runs only if, all rejected, the generation stays within 1 + max_loss
  of AR's forward time (None: no bound). `adaptive=False`: always the full k + 1 forward.
  """

  k: int = 8
  max_ngram: int = 3
  min_ngram: int = 1
  adaptive: bool = True
  sizes: tuple[int, ...] | str | None = None  # forward sizes, e.g. (1, 3, 6) or "1/3/6"; None: from k
  cost: tuple[float, ...] | None = None  # forward time per size relative to one token; None: measured
  max_loss: float | None = None  # adaptive: bound the time lost to rejected drafts (`auto`: 0.05)
  name = "pld"

  def __post_init__(self):
    if self.k < 1 or not (1 <= self.min_ngram <= self.max_ngram):
      raise InvalidOptionError(f"pld needs k >= 1 and 1 <= min_ngram <= max_ngram, got {self}")
    draft_sizing.check_max_loss("pld", self.max_loss)
    if self.sizes is None:
      sizes = draft_sizing.prefix_sizes(self.k + 1) if self.adaptive else (self.k + 1,)
    else:
      sizes = draft_sizing.parse_sizes(self.sizes)
    sizes = tuple(sorted(set(sizes)))
    if sizes[-1] != self.k + 1 or sizes[0] < 1:
      raise InvalidOptionError(f"pld sizes must lie in [1, k + 1] and end at k + 1 = {self.k + 1}, got {sizes}")
    object.__setattr__(self, "sizes", sizes)
    if self.cost is not None and len(self.cost) != len(sizes):
      raise InvalidOptionError(f"pld cost needs one time per size {sizes}, got {self.cost}")

  @property
  def _sized(self) -> bool:
    return self.adaptive and len(self.sizes) > 1

  def resolve(self, bundle) -> "PromptLookup":
    """Measured forward times for the sizes (once per model and device: profiling caches them)."""
    if not self._sized or self.cost is not None:
      return self
    return dataclasses.replace(self, cost=draft_sizing.measured_cost(bundle, self.sizes))

  @property
  def tree(self) -> TreeSpec:
    return TreeSpec.chain(self.k)

  @property
  def forward_sizes(self) -> tuple[int, ...]:
    return self.sizes

  @cached_property
  def _table(self):
    """[max_ngram + 1, k + 2, G]: one expected-accept table per matched n (the draft context)."""
    return np.stack([draft_sizing.expected_table(self.tree.parents, [0.0] + prior_accept(n, self.k))
                     for n in range(self.max_ngram + 1)])

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    if not self._sized:
      return ()
    return draft_sizing.init_stats(self.max_ngram + 1, batch_size, self.max_loss)  # context: matched n

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    cont, valid, ngram_B = lookup_continuation(state.tokens, state.num_tokens, self.k, self.max_ngram, self.min_ngram)
    # a chain: once one draft is invalid, all after it are too
    valid = jnp.cumprod(valid.astype(jnp.int32), axis=1).astype(bool)
    tokens = jnp.concatenate([last_tokens(state)[:, None], cont], axis=1)
    valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
    if self._sized:
      if self.cost is None:
        raise InvalidOptionError("pld: adaptive sizes need `cost`; resolve the method against a model "
                                 "first (generate does this)")
      size_B = draft_sizing.best_sizes(state.method_state, self._table, self.sizes, self.cost, ngram_B)
      valid &= jnp.arange(self.k + 1)[None, :] < size_B[:, None]
    return Draft(tokens=tokens, valid=valid, context=ngram_B), state.method_state

  def update(self, method_state, state, draft: Draft, logits_BxTxV, hidden, verdict, n_B):
    if not self._sized:
      return method_state
    verified_B = draft.valid.sum(axis=1)
    stats = draft_sizing.observe(method_state, self._table, verified_B, verdict.n - 1, n_B > 0, draft.context)
    return draft_sizing.spend(stats, self.sizes, self.cost, draft.valid, draft.context, n_B, n_B > 0)
