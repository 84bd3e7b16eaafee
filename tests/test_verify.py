"""Verification: greedy path selection, and exactness of stochastic verification (chi-square).

The stochastic tests build a toy target over V tokens where the next-token distribution
depends on the context (so tree nodes carry different p), draw drafts from q (with
replacement, without replacement via Gumbel-top-k, or deterministic), verify, and compare the
distribution of the first two committed tokens with AR sampling from the target. A
deliberately wrong acceptance rule must fail the same test.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from jaxspec.sampling import SamplingConfig
from jaxspec.verify import (Draft, DynamicTree, TargetRows, TreeSpec, target_rows, tree_structure, verify,
                           verify_greedy, verify_stochastic)

V = 5
N_SAMPLES = 40000


def test_tree_spec_basics():
  t = TreeSpec((-1, 0, 0, 1, 3))
  np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 3])
  np.testing.assert_array_equal(t.children[0], [1, 2])
  assert t.mask[4].tolist() == [True, True, False, True, True]
  assert TreeSpec.chain(3).is_chain and not t.is_chain
  with pytest.raises(ValueError):
    TreeSpec((0, 0))


def test_greedy_picks_deepest_matching_path_and_bonus():
  t = TreeSpec((-1, 0, 0, 1, 2, 4))  # 0 -> {1, 2}; 1 -> 3; 2 -> 4 -> 5
  toks = jnp.asarray([[9, 1, 2, 3, 4, 0]])
  # argmax at each node: node0 -> 2 (so node 2 matches), node2 -> 4 (node 4 matches), node4 -> 7 (node 5 fails)
  am = [2, 3, 4, 0, 7, 0]
  logits = jax.nn.one_hot(jnp.asarray([am]), 10) * 5.0
  v = verify_greedy(t, Draft(tokens=toks, valid=jnp.ones((1, 6), bool)), logits)
  assert int(v.n[0]) == 3
  assert v.path[0, :3].tolist() == [0, 2, 4]
  assert v.tokens[0, :3].tolist() == [2, 4, 7]
  # invalid node 4: only node 2 accepted, bonus = argmax at node 2
  v = verify_greedy(t, Draft(tokens=toks, valid=jnp.asarray([[True] * 4 + [False] * 2])), logits)
  assert int(v.n[0]) == 2 and v.tokens[0, :2].tolist() == [2, 4]


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(0.8, top_k=4)])
def test_step_target_rows_past_the_valid_nodes_are_never_read(sampling):
  """The step hands the verifier the argmax / p it computed on the rows its forward ran; the rows
  past them (invalid nodes) hold zeros. Same verdict as from the logits, whatever those rows hold."""
  t = TreeSpec((-1, 0, 0, 1, 2, 4))
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((3, 6, 12)) * 3, jnp.float32)
  toks = jnp.asarray(np.argmax(np.asarray(logits), -1)[:, [0, 0, 0, 1, 2, 4]])  # drafts the target likes
  toks = toks.at[:, 0].set(7)
  valid = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2, [True] + [False] * 5])
  draft = Draft(tokens=toks, valid=valid)
  want = verify(t, draft, logits, sampling, jax.random.key(3))
  rows = target_rows(logits, sampling)
  size_B = np.asarray([6, 4, 1])  # rows each batch row's forward ran (>= its last valid node + 1)
  past_BxT = jnp.asarray(np.arange(6)[None, :] >= size_B[:, None])
  garbage = lambda x: jnp.where(past_BxT.reshape(past_BxT.shape + (1,) * (x.ndim - 2)), x.dtype.type(5), x)
  got = verify(t, draft, logits, sampling, jax.random.key(3), target=jax.tree.map(garbage, rows))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert int(want.n[0]) >= 2  # the path was exercised, not only the root
  if sampling.greedy:  # a wrong argmax at a row the verifier reads changes the verdict
    wrong = TargetRows(argmax_BxT=rows.argmax_BxT.at[0, 0].add(1))
    assert int(verify(t, draft, logits, sampling, jax.random.key(3), target=wrong).n[0]) == 1


def _target_tables(seed):
  rng = np.random.default_rng(seed)
  P0 = rng.dirichlet(np.ones(V))
  P1 = rng.dirichlet(np.ones(V), size=V)  # P1[x1] = p(x2 | x1)
  P2 = rng.dirichlet(np.ones(V), size=(V, V))
  return P0, P1, P2


def _run(kind, rule, tree_width, seed=0):
  """Return counts[x1, x2] of the first two committed tokens over N_SAMPLES verifications."""
  P0, P1, P2 = _target_tables(seed)
  rng = np.random.default_rng(seed + 1)
  Q0 = rng.dirichlet(np.ones(V))  # draft distribution at the root
  Q1 = rng.dirichlet(np.ones(V), size=V)
  # tree: root -> w children (depth 1) -> each has one child (depth 2)
  w = tree_width
  parents = [-1] + [0] * w + list(range(1, w + 1))
  tree = TreeSpec(tuple(parents))
  T = tree.size

  def one(key):
    k1, k2, k3 = jax.random.split(key, 3)
    if kind == "without":
      g = -jnp.log(-jnp.log(jax.random.uniform(k1, (V,))))
      x1 = jnp.argsort(-(jnp.log(jnp.asarray(Q0)) + g))[:w]  # Gumbel-top-k: w distinct draws from Q0
    elif kind == "with":
      x1 = jax.random.categorical(k1, jnp.log(jnp.asarray(Q0)), shape=(w,))
    else:  # deterministic: the w most likely under Q0
      x1 = jnp.argsort(-jnp.asarray(Q0))[:w]
    x2 = jax.vmap(lambda k, a: jax.random.categorical(k, jnp.log(jnp.asarray(Q1)[a])))(jax.random.split(k2, w), x1)
    toks = jnp.concatenate([jnp.zeros((1,), jnp.int32), x1.astype(jnp.int32), x2.astype(jnp.int32)])
    # target distribution at each node (context = its path)
    p_root = jnp.asarray(P0)[None]
    p_d1 = jnp.asarray(P1)[x1]
    p_d2 = jnp.asarray(P2)[x1, x2]
    logits = jnp.log(jnp.concatenate([p_root, p_d1, p_d2]))
    q = None
    if kind != "deterministic":
      q = jnp.concatenate([jnp.asarray(Q0)[None], jnp.broadcast_to(jnp.asarray(Q0), (w, V)), jnp.asarray(Q1)[x1]])
    d = Draft(tokens=toks[None], valid=jnp.ones((1, T), bool), q_probs=None if q is None else q[None])
    v = verify_stochastic(tree, d, logits[None], SamplingConfig(1.0), k3, without_replacement=(kind == "without"),
                          accept_rule=rule)
    # second token: if only one was committed, draw it from the target given the first (AR continuation)
    t1 = v.tokens[0, 0]
    t2 = jnp.where(v.n[0] >= 2, v.tokens[0, 1],
                   jax.random.categorical(jax.random.fold_in(k3, 7), jnp.log(jnp.asarray(P1)[t1])))
    return t1, t2

  t1, t2 = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed + 2), N_SAMPLES))
  counts = np.zeros((V, V))
  np.add.at(counts, (np.asarray(t1), np.asarray(t2)), 1)
  expected = P0[:, None] * P1
  return counts, expected


def _pvalue(counts, expected):
  e = expected.ravel() * counts.sum()
  return chisquare(counts.ravel(), e / e.sum() * counts.sum()).pvalue


@pytest.mark.parametrize("kind,width", [("with", 3), ("without", 3), ("deterministic", 2), ("with", 1)])
def test_stochastic_verification_is_exact(kind, width):
  counts, expected = _run(kind, "exact", width)
  assert _pvalue(counts, expected) > 1e-3


@pytest.mark.parametrize("kind", ["with", "deterministic"])
def test_wrong_rule_is_detected(kind):
  counts, expected = _run(kind, "naive", 2)
  assert _pvalue(counts, expected) < 1e-6


def _random_tree(rng, T):
  return TreeSpec(tuple([-1] + [int(rng.integers(0, i)) for i in range(1, T)]))


def test_tree_structure_of_per_row_trees_matches_the_static_trees():
  rng = np.random.default_rng(4)
  trees = [_random_tree(rng, 9) for _ in range(3)]
  parents = jnp.asarray([t.parents for t in trees], jnp.int32)
  depth, mask = tree_structure(parents, max(t.max_depth for t in trees))
  for b, t in enumerate(trees):
    np.testing.assert_array_equal(depth[b], t.depth)
    np.testing.assert_array_equal(mask[b], t.mask)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(0.8, top_k=4)])
def test_per_row_trees_verify_as_their_static_trees(sampling):
  """A draft carrying its own trees (`Draft.parents`, bounds in a DynamicTree) gets, row by row,
  the verdict of its row's tree given as a static TreeSpec (same key, same rows)."""
  rng = np.random.default_rng(5)
  B, T, Vt = 4, 8, 6
  # four shapes with the same bounds (depth 3, 3 children): the stochastic verifier's random draws
  # depend on the bounds, so the static and per-row runs draw alike only when they agree
  trees = [TreeSpec(p) for p in ((-1, 0, 0, 0, 1, 1, 4, 2), (-1, 0, 1, 2, 0, 0, 1, 4), (-1, 0, 0, 1, 1, 1, 3, 2),
                                 (-1, 0, 1, 1, 1, 2, 0, 6))]
  assert {(t.max_depth, t.children.shape[1]) for t in trees} == {(3, 3)}
  logits = jnp.asarray(rng.standard_normal((B, T, Vt)) * 3, jnp.float32)
  am = np.argmax(np.asarray(logits), -1)
  # drafts the target mostly likes, so deep paths are accepted; some nodes invalid
  toks = np.stack([am[b][np.maximum(np.asarray(trees[b].parents), 0)] for b in range(B)])
  toks[:, 3] = (toks[:, 3] + 1) % Vt
  toks[:, 0] = 0
  valid = np.ones((B, T), bool)
  valid[1, 5:] = False
  bounds = DynamicTree(size=T, max_depth=max(t.max_depth for t in trees),
                       max_children=max(t.children.shape[1] for t in trees))
  parents = jnp.asarray([t.parents for t in trees], jnp.int32)
  got = verify(bounds, Draft(tokens=jnp.asarray(toks), valid=jnp.asarray(valid), parents=parents), logits,
               sampling, jax.random.key(1))
  deepest = 0
  for b, t in enumerate(trees):
    # row b's tree as a static TreeSpec, over a batch of B copies of row b: the verifier splits
    # its key per row, so row b of that batch draws what row b of the dynamic batch drew
    rep = lambda x: jnp.broadcast_to(jnp.asarray(x)[b:b + 1], (B,) + jnp.asarray(x).shape[1:])
    want = verify(t, Draft(tokens=rep(toks), valid=rep(valid)), rep(logits), sampling, jax.random.key(1))
    n = int(want.n[b])
    deepest = max(deepest, n)
    assert int(got.n[b]) == n
    np.testing.assert_array_equal(got.tokens[b, :n], want.tokens[b, :n])
    np.testing.assert_array_equal(got.path[b, :n], want.path[b, :n])
  assert deepest >= 3  # deep paths were exercised
