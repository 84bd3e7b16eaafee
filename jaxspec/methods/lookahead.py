"""Lookahead decoding (Fu et al. 2024): Jacobi iterations on a 2-D window feed an n-gram pool;
pool candidates keyed by the pending token are verified in the same forward.

One forward carries, after the pending token (root):
* the verification branch: G candidate (N-1)-grams from the pool, each a chain from the root
  (positions p+1..p+N-1; duplicates allowed), a static tree of G chains;
* the lookahead window: N-1 rows x W columns; the token at row r, column j sits at position
  p+1+r+j and attends to the root, row-0 columns <= j and column j of rows 1..r.
After the forward the last row's argmaxes form a new row, the n-grams (row0[j], ..., new[j])
enter the pool (key row0[j]; at most G per key, oldest evicted, duplicates skipped) and the
rows shift up. The pool (pool[V, G, N-1] + a per-key insertion counter) is shared by the rows
of a batch and may be seeded with the prompt's n-grams (and, optionally, the output's).

Greedy: the longest candidate prefix equal to the argmax chain plus the next argmax (also when
every guess matches). Sampling: candidates are deterministic drafts verified as a trie: at a
depth, distinct tokens of the candidates still matching the accepted prefix are tried in order,
x accepted with probability p(x), on rejection p(x) <- 0 and p renormalised; when all fail the
token is drawn from what is left of p. Both are lossless.

Pay per draft (`adaptive=True`; off by default, measured slower here: experiments/LOG.md,
session 8): forward sizes 1 (pending token only), the
candidate branch, and the whole layout. The candidates and the window run only while they are
expected to pay: `hit`, an exponential average of the drafts accepted per step, gives expected
tokens/s (1 + hit) / time(size) against AR's 1 / time(1) on the device's measured forward times.
A window that does not pay is dropped (it does not advance, feeds no n-grams) except for a probe
of N steps every PROBE_EVERY steps, which keeps the pool fresh and `hit` measured; candidates
still come from the pool it built and the prompt's n-grams. The choice changes what is
verified, never what is accepted.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import InvalidOptionError
from jaxspec.methods.base import Method
from jaxspec.methods.forward_layout import ForwardLayout, Segment
from jaxspec.sampling import vocab_argmax
from jaxspec.verify import Draft, TreeSpec, Verdict, verify_candidates_trie

HIT_DECAY = 0.9  # per step: ~10 steps of memory
HIT_PRIOR = 0.5  # accepted drafts per step assumed before any is seen
PROBE_EVERY = 24  # a dropped window runs N steps out of every PROBE_EVERY


def pool_insert(pool_VxGxK, count_V, keys_M, vals_MxK, ok_M):
  """Insert n-grams one by one (in order): skip one already stored under its key, else write
  slot count % G (the oldest once full) and bump the key's counter."""
  G = pool_VxGxK.shape[1]
  g_G = jnp.arange(G)

  def body(i, carry):
    pool, count = carry
    k, v = keys_M[i], vals_MxK[i]
    c = count[k]
    stored_GxK = pool[k]
    dup = jnp.any(jnp.all(stored_GxK == v[None, :], axis=1) & (g_G < jnp.minimum(c, G)))
    do = ok_M[i] & ~dup
    slot = c % G
    pool = pool.at[k, slot].set(jnp.where(do, v, stored_GxK[slot]))
    return pool, count.at[k].add(do.astype(count.dtype))

  return jax.lax.fori_loop(0, keys_M.shape[0], body, (pool_VxGxK, count_V))


def ngrams_ending_at(tokens_BxN, end_BxM, K: int):
  """n-grams of K+1 tokens ending at positions end[b, m]: (keys [B, M], values [B, M, K])."""
  offs = jnp.arange(-K, 1, dtype=jnp.int32)
  idx_BxMxK1 = jnp.clip(end_BxM[..., None] + offs, 0, tokens_BxN.shape[1] - 1)
  gram = jax.vmap(lambda t, i: t[i])(tokens_BxN, idx_BxMxK1)
  return gram[..., 0], gram[..., 1:]


@dataclasses.dataclass(frozen=True)
class Lookahead(Method):
  """W window columns, N n-gram size (window rows N-1), G candidates verified per step.

  `seed_pool`: insert the prompt's n-grams at prefill. `output_ngrams`: also insert the
  n-grams that end in each newly committed token. Sampling verifies the candidates as a trie
  of deterministic drafts (`jaxspec.verify.verify_candidates_trie`).
  """

  W: int = 5
  N: int = 4
  G: int = 5
  seed_pool: bool = True
  output_ngrams: bool = False
  adaptive: bool = False
  cost: tuple[float, ...] | None = None  # forward time of forward_sizes relative to one token; None: measured
  name = "lookahead"
  has_prefill = True

  def __post_init__(self):
    if self.W < 1 or self.N < 2 or self.G < 1:
      raise InvalidOptionError(f"lookahead needs W >= 1, N >= 2, G >= 1, got W={self.W} N={self.N} G={self.G}")
    if self.cost is not None and len(self.cost) != len(self.forward_sizes):
      raise InvalidOptionError(f"lookahead cost needs one time per size {self.forward_sizes}, got {self.cost}")

  @property
  def forward_sizes(self) -> tuple[int, ...]:
    return (1, self.tree.size, self.scratch_tokens) if self.adaptive else (self.scratch_tokens,)

  def resolve(self, bundle) -> "Lookahead":
    """Measured forward times of the sizes (once per model and device)."""
    if not self.adaptive or self.cost is not None:
      return self
    from jaxspec.methods.draft_sizing import measured_cost
    return dataclasses.replace(self, cost=measured_cost(bundle, self.forward_sizes))

  def _pays(self, hit, size_index: int):
    """Scalar bool: (1 + hit) drafts per forward of forward_sizes[size_index] beat AR."""
    if self.cost is None:
      raise InvalidOptionError("lookahead: adaptive sizes need `cost`; resolve the method against a model "
                               "first (generate does this)")
    return (1.0 + hit) / self.cost[size_index] >= 1.0

  @property
  def K(self) -> int:
    """Tokens per candidate, rows of the window."""
    return self.N - 1

  @cached_property
  def tree(self) -> TreeSpec:
    K = self.K
    parents = [-1]
    for g in range(self.G):
      parents += [0] + [1 + g * K + d for d in range(K - 1)]
    return TreeSpec(tuple(parents))

  @property
  def candidate_nodes(self) -> np.ndarray:
    """[G, K] tree node id of candidate g's token at depth d+1."""
    return 1 + np.arange(self.G)[:, None] * self.K + np.arange(self.K)[None, :]

  @cached_property
  def forward_layout(self) -> ForwardLayout:
    """The tree of G candidates, then the window: K rows x W columns (row-major); window token
    (r, j) sits at depth 1 + r + j and sees row 0 up to column j and column j up to row r."""
    K, W = self.K, self.W
    r, j = np.meshgrid(np.arange(K), np.arange(W), indexing="ij")
    win = lambda r, j: r * W + j
    mask = np.zeros((K * W, K * W), bool)
    for rr in range(K):
      for jj in range(W):
        mask[win(rr, jj), [win(0, c) for c in range(jj + 1)]] = True
        mask[win(rr, jj), [win(s, jj) for s in range(1, rr + 1)]] = True
    return ForwardLayout(self.tree, (Segment.of("window", (1 + r + j).reshape(-1), mask),))

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    return dict(pool=jnp.zeros((config.vocab_size, self.G, self.K), jnp.int32),
                count=jnp.zeros((config.vocab_size,), jnp.int32),
                window=jnp.zeros((batch_size, self.K, self.W), jnp.int32),
                hit=jnp.asarray(HIT_PRIOR, jnp.float32),  # accepted drafts per step (average)
                window_steps=jnp.zeros((), jnp.int32))  # forwards the window has run in

  def method_state_axes(self, method_state):
    return dict(pool=(None, None, None), count=(None,), window=("batch", None, None), hit=(), window_steps=())

  def prefill(self, model, mparams, state: DecodeState, prompt_len: int, attn_impl, hidden):
    """Window rows from prompt tokens spread over the prompt; pool seeded with prompt n-grams."""
    ms = dict(state.method_state)
    B, K, W = state.batch_size, self.K, self.W
    frac = (np.arange(K * W) * 0.618034) % 1.0  # golden-ratio spread: varied, deterministic
    idx_BxKW = jnp.floor(jnp.asarray(frac, jnp.float32)[None, :] * state.prompt_lens[:, None]).astype(jnp.int32)
    ms["window"] = jnp.take_along_axis(state.tokens, idx_BxKW, axis=1).reshape(B, K, W)
    if self.seed_pool and prompt_len > K:
      ends = jnp.arange(K, prompt_len + 1, dtype=jnp.int32)  # up to the first generated token
      keys, vals = ngrams_ending_at(state.tokens, jnp.broadcast_to(ends, (B, ends.shape[0])), K)
      ok = ends[None, :] < state.num_tokens[:, None]
      # position-major order: later n-grams are the more recent ones
      ms["pool"], ms["count"] = pool_insert(ms["pool"], ms["count"], keys.T.reshape(-1),
                                            vals.transpose(1, 0, 2).reshape(-1, K), ok.T.reshape(-1))
    return ms

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    ms = state.method_state
    B, G, K = state.batch_size, self.G, self.K
    root_B = last_tokens(state)
    c_B = ms["count"][root_B]
    g_G = jnp.arange(G, dtype=jnp.int32)
    slot_BxG = (c_B[:, None] - 1 - g_G[None, :]) % G  # most recent first
    cands_BxGxK = ms["pool"][root_B[:, None], slot_BxG]
    valid_BxG = g_G[None, :] < jnp.minimum(c_B, G)[:, None]
    tokens = jnp.concatenate([root_B[:, None], cands_BxGxK.reshape(B, G * K), ms["window"].reshape(B, K * self.W)],
                             axis=1)
    window_on = jnp.ones((), bool)
    if self.adaptive:  # verify / run only what is expected to pay (a probe keeps the window measured)
      probe = (state.step % PROBE_EVERY) < self.N
      window_on = self._pays(ms["hit"], 2) | probe
      valid_BxG &= self._pays(ms["hit"], 1) | window_on
    valid = jnp.concatenate([jnp.ones((B, 1), bool), jnp.repeat(valid_BxG, K, axis=1),
                             jnp.broadcast_to(window_on, (B, K * self.W))], axis=1)
    return Draft(tokens=tokens, valid=valid, context=window_on), ms

  def verify(self, draft: Draft, logits_BxTxV, sampling, key, target=None) -> Verdict:
    if sampling.greedy:
      return super().verify(draft, logits_BxTxV, sampling, key, target)
    return verify_candidates_trie(self.candidate_nodes, draft, logits_BxTxV, sampling, key, target=target)

  def update(self, method_state, state, draft, logits_BxTxV, hidden, verdict, n_B):
    ms = dict(method_state)
    B, K, W = state.batch_size, self.K, self.W
    window_BxKWxV = logits_BxTxV[:, self.forward_layout.slice("window")]
    new_BxW = vocab_argmax(window_BxKWxV[:, (K - 1) * W:])  # the window's last row
    win_BxKxW = ms["window"]
    keys_BxW = win_BxKxW[:, 0, :]
    vals_BxWxK = jnp.concatenate([jnp.swapaxes(win_BxKxW[:, 1:, :], 1, 2), new_BxW[:, :, None]], axis=2)
    window_on = draft.context  # scalar: the window was in this forward
    warm = ms["window_steps"] >= K - 1  # rows 1..N-2 come from forwards, not from the init
    ok_BxW = jnp.broadcast_to(((~state.done) & warm & window_on)[:, None], (B, W))
    keys_M, vals_MxK, ok_M = keys_BxW.reshape(-1), vals_BxWxK.reshape(-1, K), ok_BxW.reshape(-1)
    if self.output_ngrams:  # n-grams ending in each newly committed token
      M = self.max_commit
      end_BxM = state.num_tokens[:, None] - n_B[:, None] + jnp.arange(M, dtype=jnp.int32)[None, :]
      ok_out = (jnp.arange(M)[None, :] < n_B[:, None]) & (end_BxM >= K)
      k_out, v_out = ngrams_ending_at(state.tokens, end_BxM, K)
      keys_M = jnp.concatenate([keys_M, k_out.reshape(-1)])
      vals_MxK = jnp.concatenate([vals_MxK, v_out.reshape(-1, K)])
      ok_M = jnp.concatenate([ok_M, ok_out.reshape(-1)])
    ms["pool"], ms["count"] = pool_insert(ms["pool"], ms["count"], keys_M, vals_MxK, ok_M)
    ms["window"] = jnp.where(window_on, jnp.concatenate([win_BxKxW[:, 1:, :], new_BxW[:, None, :]], axis=1), win_BxKxW)
    ms["window_steps"] = ms["window_steps"] + window_on.astype(jnp.int32)
    active_B = n_B > 0
    accepted = jnp.sum(jnp.where(active_B, verdict.n - 1, 0)) / jnp.maximum(jnp.sum(active_B), 1)
    ms["hit"] = jnp.where(jnp.any(active_B), HIT_DECAY * ms["hit"] + (1 - HIT_DECAY) * accepted, ms["hit"])
    return ms
