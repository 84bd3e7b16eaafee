"""Prompt lookup decoding (PLD): draft the tokens that followed the latest earlier occurrence of
the last n tokens (n from max_ngram down to min_ngram) in prompt + output. Lossless: drafts are
deterministic and verified by the shared verifier."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import InvalidOptionError
from jaxspec.methods.base import Method
from jaxspec.verify import Draft, TreeSpec


def lookup_continuation(tokens_BxN, num_B, k: int, max_ngram: int, min_ngram: int):
  """For each row, the k tokens after the most recent earlier match of its last n tokens.

  Returns (draft [B, k] int32, valid [B, k] bool). Longer n-grams win; no match -> all invalid.
  """
  B, N = tokens_BxN.shape
  j_N = jnp.arange(N, dtype=jnp.int32)
  best_start = jnp.full((B,), -1, jnp.int32)  # index of the first continuation token
  for n in range(max_ngram, min_ngram - 1, -1):
    match_BxN = jnp.ones((B, N), bool)
    for i in range(n):
      tail_i = jnp.take_along_axis(tokens_BxN, jnp.maximum(num_B - n + i, 0)[:, None], axis=1)  # [B, 1]
      shifted = jnp.roll(tokens_BxN, -i, axis=1)  # shifted[:, j] = tokens[:, j + i]
      match_BxN &= shifted == tail_i
    # window j..j+n-1 must end before the tail starts being the tail itself, continuation j+n < num
    ok_BxN = match_BxN & (j_N[None, :] + n < num_B[:, None]) & (num_B[:, None] >= n + 1)
    start_B = jnp.max(jnp.where(ok_BxN, j_N[None, :] + n, -1), axis=1)
    best_start = jnp.where((best_start < 0) & (start_B >= 0), start_B, best_start)
  idx_Bxk = best_start[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
  draft = jnp.take_along_axis(tokens_BxN, jnp.clip(idx_Bxk, 0, N - 1), axis=1)
  valid = (best_start[:, None] >= 0) & (idx_Bxk < num_B[:, None])
  return draft.astype(jnp.int32), valid


@dataclasses.dataclass(frozen=True)
class PromptLookup(Method):
  """Chain draft of `k` tokens from n-gram lookup in the row's own prompt + output."""

  k: int = 8
  max_ngram: int = 3
  min_ngram: int = 1
  name = "pld"

  def __post_init__(self):
    if self.k < 1 or not (1 <= self.min_ngram <= self.max_ngram):
      raise InvalidOptionError(f"pld needs k >= 1 and 1 <= min_ngram <= max_ngram, got {self}")

  @property
  def tree(self) -> TreeSpec:
    return TreeSpec.chain(self.k)

  def propose(self, model, mparams, state: DecodeState, sampling, key):
    cont, valid = lookup_continuation(state.tokens, state.num_tokens, self.k, self.max_ngram, self.min_ngram)
    # a chain: once one draft is invalid, all after it are too
    valid = jnp.cumprod(valid.astype(jnp.int32), axis=1).astype(bool)
    tokens = jnp.concatenate([last_tokens(state)[:, None], cont], axis=1)
    valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
    return Draft(tokens=tokens, valid=valid), state.method_state
