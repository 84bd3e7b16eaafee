"""Jacobi decoding (greedy; Santilli et al. 2023) and the window machinery SJD shares.

A window of n slots follows the committed prefix: slot 0 is the pending token, slots 1..n-1
hold guesses. One causal forward over the window (a chain draft); the guess at slot i is
accepted when every earlier guess was and it equals the argmax at slot i-1, then the argmax
after the last accepted slot is committed too (the bonus). Output equals greedy AR.
The argmaxes past the accepted prefix are the next window's guesses (shifted, carried in
`method_state`); the freed tail of the window is refilled by the `init` strategy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import InvalidOptionError
from jaxspec.methods.base import Method
from jaxspec.sampling import vocab_argmax
from jaxspec.verify import Draft, TreeSpec

# How a fresh window slot is filled; for SJD each also fixes the slot's q.
INITS = {
    "pad": "the fixed token `pad_token` (q one-hot)",
    "prompt": "a token drawn uniformly from the row's prompt positions (q = prompt token histogram)",
    "ngram": "the token after the latest earlier occurrence of the previous slot's token (q one-hot)",
    "random": "uniform over the vocabulary (q uniform)",
    "repeat": "a copy of the previous slot's token (q one-hot)",
    "left": "token grids of row width w: the token to the left; at column 0 the one above (q one-hot)",
    "above": "token grids of row width w: the token w positions back; in the first grid row the left one",
}
UNIFORM, PROMPT, ONE_HOT = "uniform", "prompt", "one_hot"  # kinds of init distribution


def _at_offset(tokens_BxN, num_B, offset_B):
  """[B] tokens at position num - 1 + offset (offset <= 0: committed tokens, the pending one at 0)."""
  idx_B = jnp.clip(num_B - 1 + offset_B, 0, tokens_BxN.shape[1] - 1)
  return jnp.take_along_axis(tokens_BxN, idx_B[:, None], axis=1)[:, 0]


def _successor(tokens_BxN, num_B, x_B):
  """[B] token after the latest occurrence of x before the pending position (x itself if none)."""
  j_N = jnp.arange(tokens_BxN.shape[1], dtype=jnp.int32)
  hit_BxN = (tokens_BxN == x_B[:, None]) & (j_N[None, :] < num_B[:, None] - 1)
  last_B = jnp.max(jnp.where(hit_BxN, j_N[None, :], -1), axis=1)
  succ_B = jnp.take_along_axis(tokens_BxN, jnp.maximum(last_B + 1, 0)[:, None], axis=1)[:, 0]
  return jnp.where(last_B >= 0, succ_B, x_B)


def prompt_histogram(state: DecodeState, vocab: int) -> jax.Array:
  """[B, V] empirical distribution of each row's prompt tokens."""
  N = state.tokens.shape[1]
  in_prompt_BxN = jnp.arange(N)[None, :] < state.prompt_lens[:, None]
  hist = jax.vmap(lambda t, m: jnp.zeros((vocab,), jnp.float32).at[t].add(m.astype(jnp.float32)))(
      state.tokens, in_prompt_BxN)
  return hist / jnp.maximum(state.prompt_lens, 1)[:, None].astype(jnp.float32)


class WindowMethod(Method):
  """A window of `window` slots verified as a chain; subclasses set the fields `init`,
  `pad_token`, `w` and the property `window`."""

  @property
  def window(self) -> int:
    raise NotImplementedError

  @property
  def tree(self) -> TreeSpec:
    return TreeSpec.chain(self.window - 1)

  def _check(self, name: str):
    if self.window < 2:
      raise InvalidOptionError(f"{name} needs a window of at least 2 slots, got {self.window}")
    if self.init not in INITS:
      raise InvalidOptionError(f"{name} init must be one of {sorted(INITS)}, got {self.init!r}")
    if self.init in ("left", "above") and self.w < 1:
      raise InvalidOptionError(f"{name} init={self.init!r} is for token grids: give the row width w >= 1")

  @property
  def init_kind(self) -> str:
    return {"random": UNIFORM, "prompt": PROMPT}.get(self.init, ONE_HOT)

  def _fresh(self, state: DecodeState, toks: list, i: int, key, vocab: int) -> jax.Array:
    """[B] init token for window slot i, given the tokens of slots < i."""
    B = state.batch_size
    prev_B = toks[i - 1]
    if self.init == "pad":
      return jnp.full((B,), self.pad_token, jnp.int32)
    if self.init == "random":
      return jax.random.randint(key, (B,), 0, vocab, jnp.int32)
    if self.init == "prompt":
      idx_B = jax.random.randint(key, (B,), 0, jnp.maximum(state.prompt_lens, 1), jnp.int32)
      return jnp.take_along_axis(state.tokens, idx_B[:, None], axis=1)[:, 0]
    if self.init == "repeat":
      return prev_B
    if self.init == "ngram":
      return _successor(state.tokens, state.num_tokens, prev_B)
    # Token grids starting at the prompt end: grid index g of slot i.
    g_B = state.num_tokens - 1 + i - state.prompt_lens
    above_B = toks[i - self.w] if i >= self.w else _at_offset(state.tokens, state.num_tokens,
                                                               jnp.full((B,), i - self.w, jnp.int32))
    has_above_B = g_B >= self.w
    if self.init == "above":
      return jnp.where(has_above_B, above_B, prev_B)
    at_col0_B = (g_B % self.w == 0) & has_above_B  # "left"
    return jnp.where(at_col0_B, above_B, prev_B)

  def fill_window(self, state: DecodeState, carried_BxK, n_carried_B, key, vocab: int) -> jax.Array:
    """[B, window] tokens: the pending token, the first n_carried carried guesses, then init."""
    keys = jax.random.split(key, self.window)
    toks = [last_tokens(state)]
    for i in range(1, self.window):
      fresh_B = self._fresh(state, toks, i, keys[i], vocab)
      toks.append(jnp.where(n_carried_B > i - 1, carried_BxK[:, i - 1], fresh_B).astype(jnp.int32))
    return jnp.stack(toks, axis=1)

  @staticmethod
  def shift_index(verdict_n_B, window: int) -> tuple[jax.Array, jax.Array]:
    """Carried slots after accepting n-1 guesses: next slot j+1 takes the output at old slot n+j.
    Returns (gather index [B, window-1], carried count [B] = window - n)."""
    idx_BxK = verdict_n_B[:, None] + jnp.arange(window - 1, dtype=jnp.int32)[None, :]
    return jnp.minimum(idx_BxK, window - 1), window - verdict_n_B


@dataclasses.dataclass(frozen=True)
class Jacobi(WindowMethod):
  """Greedy Jacobi decoding, window of `n` slots (the pending token + n-1 guesses).

  `init`: how fresh slots are filled (see INITS); `pad_token` for init="pad"; `w` the row
  width for the token-grid inits. Lossless under greedy. Under sampling the drafts are
  treated as deterministic (lossless, but SJD is the sampling method of this family).
  """

  n: int = 8
  init: str = "ngram"
  pad_token: int = 0
  w: int = 0
  name = "jacobi"

  def __post_init__(self):
    self._check("jacobi")

  @property
  def window(self) -> int:
    return self.n

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    return dict(guess=jnp.zeros((batch_size, self.n - 1), jnp.int32),
                carried=jnp.zeros((batch_size,), jnp.int32))

  def method_state_axes(self, method_state):
    return dict(guess=("batch", None), carried=("batch",))

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    ms = state.method_state
    _, k_init = jax.random.split(key)  # as SJD's split: same init draws, same steps at temperature 0
    tokens = self.fill_window(state, ms["guess"], ms["carried"], k_init, model.config.vocab_size)
    return Draft(tokens=tokens, valid=jnp.ones(tokens.shape, bool)), ms

  def update(self, method_state, state, draft, logits_BxTxV, hidden, verdict, n_B):
    argmax_BxT = vocab_argmax(logits_BxTxV[:, :self.n])
    idx_BxK, carried_B = self.shift_index(verdict.n, self.n)
    return dict(guess=jnp.take_along_axis(argmax_BxT, idx_BxK, axis=1), carried=carried_B)
