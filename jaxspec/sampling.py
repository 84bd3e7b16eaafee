"""Sampling configuration and the target distribution p every method samples from.

One definition of "the distribution after temperature, top-k and top-p" is shared by AR
sampling and by every lossless verifier, so a method is lossless only with respect to it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.errors import InvalidOptionError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy (argmax). top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (self.temperature >= 0.0):
      raise InvalidOptionError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise InvalidOptionError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
    if not (0.0 < self.top_p <= 1.0):
      raise InvalidOptionError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def target_logprobs(logits_xV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """log p over the vocabulary after temperature, top-k, top-p; excluded tokens get -inf.

  Works on any leading shape [..., V]. For greedy configs this is the temperature-1
  distribution (used only by statistics, never for choosing tokens).
  """
  x = logits_xV.astype(jnp.float32)
  if cfg.temperature > 0:
    x = x / cfg.temperature
  if cfg.top_k and cfg.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if cfg.top_p < 1.0:
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
    sorted_p = jax.nn.softmax(sorted_x, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p.
    mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = mass_before < cfg.top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return jax.nn.log_softmax(x, axis=-1)


def vocab_argmax(logits_xV: jax.Array) -> jax.Array:
  """int32 index of the largest entry on the last axis, the lowest index among ties: what
  `jnp.argmax` returns for NaN-free input (a row with a NaN gives an id in range, unspecified).

  Two plain reductions (the max, then the first index holding it): XLA CPU vectorizes them,
  while `jnp.argmax`'s (value, index) reduce ran 4x slower over a 49k vocabulary (0.14 vs 0.034
  ms a row; experiments/LOG.md, session 14)."""
  V = logits_xV.shape[-1]
  if V > 2 ** 24:  # float32 holds every index exactly up to 2^24
    return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)
  top = jnp.max(logits_xV, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.float32, logits_xV.shape, logits_xV.ndim - 1)
  first = -jnp.max(jnp.where(logits_xV == top, -index, -jnp.inf), axis=-1)
  return jnp.clip(first, 0, V - 1).astype(jnp.int32)


def sample_tokens(logits_xV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token per leading index: argmax when greedy, else a draw from target_logprobs."""
  if cfg.greedy:
    return vocab_argmax(logits_xV)
  return jax.random.categorical(key, target_logprobs(logits_xV, cfg), axis=-1).astype(jnp.int32)
