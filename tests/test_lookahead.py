"""Lookahead decoding (the real-model identity test is tests/test_lossless_greedy.py): the 2-D
window's positions and mask, the n-gram pool, the bonus token on a full match, and
exact sampling: the trie verifier on a toy target, end to end on a small random model (chi-square
against the exact distribution), and a wrong rule that the same test detects."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

import jaxspec
from conftest import make_tiny_bundle
from decoding_checks import exact_distribution, gof_pvalue, peaked_tiny_bundle, sample_counts
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import get_method
import dataclasses

from jaxspec.methods.lookahead import Lookahead, pool_insert
from jaxspec.sampling import SamplingConfig
from jaxspec.verify import Draft, verify_candidates_trie


def test_window_positions_and_mask():
  m = get_method("lookahead", W=3, N=4, G=2)
  K, W, t0 = 3, 3, 1 + 2 * 3
  assert m.tree.parents == (-1, 0, 1, 2, 0, 4, 5)
  assert m.scratch_tokens == t0 + K * W and m.max_commit == 4
  depth, mask = m.forward_depth, m.forward_mask
  win = lambda r, j: t0 + r * W + j
  for r, j in itertools.product(range(K), range(W)):
    assert depth[win(r, j)] == 1 + r + j
    sees = set(np.nonzero(mask[win(r, j)])[0].tolist())
    assert sees == {0} | {win(0, c) for c in range(j + 1)} | {win(s, j) for s in range(1, r + 1)}
  # each candidate is a chain from the root and sees nothing of the window or other candidates
  assert set(np.nonzero(mask[6])[0].tolist()) == {0, 4, 5, 6}
  assert not mask[:t0, t0:].any()


def test_pool_insert_dedups_and_evicts_oldest():
  pool, count = jnp.zeros((8, 2, 2), jnp.int32), jnp.zeros((8,), jnp.int32)
  keys = jnp.asarray([3, 3, 3, 3, 5])
  vals = jnp.asarray([[1, 2], [1, 2], [4, 4], [6, 7], [1, 1]])
  pool, count = pool_insert(pool, count, keys, vals, jnp.asarray([True, True, True, True, False]))
  assert count.tolist()[3] == 3 and count.tolist()[5] == 0  # duplicate skipped, masked one not inserted
  assert sorted(map(tuple, pool[3].tolist())) == [(4, 4), (6, 7)]  # (1, 2) was the oldest: evicted


def test_tiny_greedy_matches_ar_and_commits_bonus_on_full_match():
  b = make_tiny_bundle(vocab=32)
  prompts = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4], [10, 11, 12, 13, 14, 15, 16]]
  ref = jaxspec.generate(b, prompts, max_new_tokens=40).token_ids
  out = jaxspec.generate(b, prompts, method="lookahead", method_options=dict(W=3, N=3, G=3), max_new_tokens=40)
  assert out.token_ids == ref
  assert out.stats.accept_hist[3] > 0  # N-1 = 2 guesses accepted plus the bonus: 3 tokens in a step


@pytest.mark.parametrize("cost,expect", [((1.0, 1.0, 1.0), "always"), ((1.0, 50.0, 90.0), "probes"),
                                        ((1.0, 1.0, 90.0), "candidates")])
def test_adaptive_window_runs_only_what_pays_and_keeps_ar_output(cost, expect):
  b = make_tiny_bundle(vocab=32)
  prompts = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4], [10, 11, 12, 13, 14, 15, 16]]
  ref = jaxspec.generate(b, prompts, max_new_tokens=40).token_ids
  full = jaxspec.generate(b, prompts, Lookahead(W=3, N=3, G=3, adaptive=False), max_new_tokens=40)
  m = Lookahead(W=3, N=3, G=3, adaptive=True, cost=cost)
  assert m.forward_sizes == (1, 7, 13)
  got = jaxspec.generate(b, prompts, m, max_new_tokens=40)
  assert got.token_ids == ref == full.token_ids
  s = got.stats
  if expect == "always":  # everything pays: the fixed layout's steps exactly
    assert (s.steps, s.forward_tokens) == (full.stats.steps, full.stats.forward_tokens)
  elif expect == "probes":  # nothing pays: 1-token steps but for the window's probes (N of every 24 steps)
    probes = sum(1 for t in range(s.steps) if t % 24 < 3)
    assert s.forward_tokens == s.steps + probes * 12
  else:  # candidates pay, the window does not: it runs in probes only, candidates in between
    assert s.steps < s.forward_tokens < 13 * s.steps and s.tokens_per_forward > 1.0
  with pytest.raises(InvalidOptionError, match="one time per size"):
    Lookahead(W=3, N=3, G=3, adaptive=True, cost=(1.0, 2.0))


def test_bad_options_raise():
  for opts in (dict(N=1), dict(W=0), dict(G=0), dict(bogus=1)):
    with pytest.raises(InvalidOptionError):
      get_method("lookahead", **opts)


# --- the trie verifier on a toy target --------------------------------------------------------

V = 5


def _toy_run(rule, n=40000, seed=0):
  """Counts of the first two committed tokens (the second drawn from the target when only one
  was committed) with G=3 candidates of length 2 that share prefixes and repeat tokens."""
  rng = np.random.default_rng(seed)
  P0 = rng.dirichlet(np.ones(V))
  P1 = rng.dirichlet(np.ones(V), size=V)
  P2 = rng.dirichlet(np.ones(V), size=(V, V))
  a, b = np.argsort(-P0)[:2]
  cands = np.array([[a, 0], [a, 1], [b, 2]])  # candidates 0 and 1 share their first token
  cands[1, 1] = np.argmax(P1[a])  # the second-best continuation lives in the second candidate
  nodes = 1 + np.arange(3)[:, None] * 2 + np.arange(2)[None, :]
  toks = np.zeros(7, np.int32)
  toks[nodes] = cands
  toks_j = jnp.asarray(toks)
  logits = np.zeros((7, V))
  logits[0] = np.log(P0)
  for g in range(3):
    logits[nodes[g, 0]] = np.log(P1[cands[g, 0]])
    logits[nodes[g, 1]] = np.log(P2[cands[g, 0], cands[g, 1]])
  logits_j = jnp.asarray(logits, jnp.float32)

  def one(key):
    k1, k2 = jax.random.split(key)
    d = Draft(tokens=toks_j[None], valid=jnp.ones((1, 7), bool))
    v = verify_candidates_trie(nodes, d, logits_j[None], SamplingConfig(1.0), k1, rule)
    t1 = v.tokens[0, 0]
    t2 = jnp.where(v.n[0] >= 2, v.tokens[0, 1], jax.random.categorical(k2, jnp.log(jnp.asarray(P1, jnp.float32)[t1])))
    # the committed path must be one candidate's chain matching the committed tokens
    ok = jnp.all(jnp.where(jnp.arange(2) < v.n[0] - 1, toks_j[v.path[0, 1:]] == v.tokens[0, :2], True))
    return t1, t2, ok

  t1, t2, ok = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed + 1), n))
  assert bool(ok.all())
  counts = np.zeros((V, V))
  np.add.at(counts, (np.asarray(t1), np.asarray(t2)), 1)
  e = (P0[:, None] * P1).ravel() * n
  return chisquare(counts.ravel(), e / e.sum() * n).pvalue


def test_trie_verification_is_exact_and_naive_rule_is_detected():
  assert _toy_run("exact") > 1e-3
  assert _toy_run("naive") < 1e-6


# --- end to end sampling on a small random model ----------------------------------------------

SAMPLING = SamplingConfig(1.0)


@pytest.fixture(scope="module")
def peaked():
  b = peaked_tiny_bundle()
  # a prompt the model itself wrote: its n-grams (seeding the pool) are plausible candidates
  seed_prompt = [3, 7, 2]
  prompt = seed_prompt + jaxspec.generate(b, [seed_prompt], max_new_tokens=21, temperature=1.0, seed=5).token_ids[0]
  return b, prompt, exact_distribution(b, prompt, SAMPLING)


@pytest.mark.slow  # end-to-end sampling: thousands of rows per method, several compiles
@pytest.mark.parametrize("opts", [{}, dict(adaptive=True, cost=(1.0, 1.0, 90.0))])  # adaptive: window in probes only
def test_sampling_matches_exact_distribution(peaked, opts):
  b, prompt, P = peaked
  counts, stats = sample_counts(b, prompt, SAMPLING, "lookahead", dict(W=3, N=3, G=3, **opts), rows=1500, chunks=2)
  assert stats.tokens_per_forward > 1.1  # candidates are being accepted
  assert gof_pvalue(counts, P) > 1e-3


@dataclasses.dataclass(frozen=True)
class NaiveLookahead(Lookahead):
  """Lookahead with a wrong trie rule (keep p on rejection), injected by the test."""

  def verify(self, draft, logits_BxTxV, sampling, key, target=None):
    return verify_candidates_trie(self.candidate_nodes, draft, logits_BxTxV, sampling, key, accept_rule="naive")


@pytest.mark.slow  # end-to-end sampling: thousands of rows per method, several compiles
def test_wrong_rule_is_detected(peaked):
  b, prompt, P = peaked
  counts, _ = sample_counts(b, prompt, SAMPLING, NaiveLookahead(W=3, N=3, G=3), rows=1500, chunks=2)
  assert gof_pvalue(counts, P) < 1e-6
