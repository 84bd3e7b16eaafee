"""Speculative Jacobi Decoding (SJD; Teng et al. 2024): Jacobi decoding for sampling, lossless.

Window of L slots (the pending token + L-1 drafts). Every draft x_i keeps the exact
distribution q_i it was drawn from: the previous forward's output distribution at the slot
before it (the logits are carried, drafts are drawn from them at the start of the step), or
the init distribution for a freshly filled slot (one-hot for copied / deterministic tokens,
uniform for `random`, the prompt-token histogram for `prompt`). One forward; x_i is accepted
with probability min(1, p(x_i)/q_i(x_i)) left to right, the first rejection is replaced by a
sample from norm(max(0, p - q_i)), all accepted gives a bonus sample: the shared chain
verifier with per-node q. The committed tokens are distributed exactly as AR sampling.
With temperature 0 the drafts are the carried argmaxes and verification is greedy: the
steps are exactly `jacobi`'s with the same init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.decode_state import DecodeState
from jaxspec.methods.jacobi import ONE_HOT, PROMPT, UNIFORM, WindowMethod, prompt_histogram
from jaxspec.sampling import target_logprobs, vocab_argmax
from jaxspec.verify import Draft

@dataclasses.dataclass(frozen=True)
class SJD(WindowMethod):
  """`L`: window slots; `init`: fresh-slot strategy (jaxspec.methods.jacobi.INITS; the paper's
  is "random"); `w`: row width for token grids ("left"/"above"), the grid starts at the prompt
  end.
  """

  L: int = 16
  init: str = "random"
  pad_token: int = 0
  w: int = 0
  name = "sjd"

  def __post_init__(self):
    self._check("sjd")

  @property
  def window(self) -> int:
    return self.L

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    # Logits of the carried slots: their q (after the sampling processors) and their argmax.
    return dict(logits=jnp.zeros((batch_size, self.L - 1, config.vocab_size), jnp.float32),
                carried=jnp.zeros((batch_size,), jnp.int32))

  def method_state_axes(self, method_state):
    return dict(logits=("batch", None, None), carried=("batch",))

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    ms = state.method_state
    V = model.config.vocab_size
    k_carry, k_init = jax.random.split(key)
    if sampling.greedy:
      carried_BxK = vocab_argmax(ms["logits"])
      tokens = self.fill_window(state, carried_BxK, ms["carried"], k_init, V)
      return Draft(tokens=tokens, valid=jnp.ones(tokens.shape, bool)), ms
    logq_BxKxV = target_logprobs(ms["logits"], sampling)
    carried_BxK = jax.random.categorical(k_carry, logq_BxKxV, axis=-1).astype(jnp.int32)
    tokens = self.fill_window(state, carried_BxK, ms["carried"], k_init, V)
    B, L = tokens.shape
    kind = self.init_kind
    if kind == UNIFORM:
      fresh_BxKxV = jnp.full((B, L - 1, V), 1.0 / V, jnp.float32)
    elif kind == PROMPT:
      fresh_BxKxV = jnp.broadcast_to(prompt_histogram(state, V)[:, None, :], (B, L - 1, V))
    else:
      assert kind == ONE_HOT
      fresh_BxKxV = jax.nn.one_hot(tokens[:, 1:], V, dtype=jnp.float32)
    is_carried_BxK = jnp.arange(L - 1)[None, :] < ms["carried"][:, None]
    q_BxKxV = jnp.where(is_carried_BxK[..., None], jnp.exp(logq_BxKxV), fresh_BxKxV)
    q_BxLxV = jnp.concatenate([jax.nn.one_hot(tokens[:, :1], V, dtype=jnp.float32), q_BxKxV], axis=1)
    return Draft(tokens=tokens, valid=jnp.ones(tokens.shape, bool), q_probs=q_BxLxV), ms

  def update(self, method_state, state, draft, logits_BxTxV, hidden, verdict, n_B):
    idx_BxK, carried_B = self.shift_index(verdict.n, self.L)
    logits_BxKxV = jnp.take_along_axis(logits_BxTxV[:, :self.L].astype(jnp.float32), idx_BxK[..., None], axis=1)
    return dict(logits=logits_BxKxV, carried=carried_B)
