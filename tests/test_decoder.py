"""The forward contract on a random small model: incremental == full, trees == chains, ragged rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from conftest import jit_forward, make_tiny_bundle
from jaxspec.models.kv_cache import advance, commit, init_cache, write_new


class _Jitted:
  def __init__(self, bundle):
    self.config, self._f = bundle.config, jit_forward(bundle)

  def __call__(self, cache, tokens, positions, mask, capture=(), logits_index_BxN=None):
    return self._f(cache, tokens, positions, mask, logits_index_BxN)


def _model(**kw):
  return _Jitted(make_tiny_bundle(**kw))


def _full_logits(model, ids):
  T = len(ids)
  cache = init_cache(model.config, 1, 64)
  lg, _, _ = model(cache, jnp.asarray([ids]), jnp.arange(T)[None], jnp.tril(jnp.ones((T, T), bool)))
  return np.asarray(lg[0])


@pytest.mark.parametrize("qkv_bias,tie", [(False, False), (True, True)])
def test_incremental_equals_full(qkv_bias, tie):
  model = _model(seed=1, qkv_bias=qkv_bias, tie=tie)
  ids = [3, 9, 4, 17, 22, 5, 8, 30]
  full = _full_logits(model, ids)
  cache = init_cache(model.config, 1, 64)
  # prefill 5, then a chunk of 2, then 1
  out = []
  for chunk in ([3, 9, 4, 17, 22], [5, 8], [30]):
    T = len(chunk)
    pos = cache.lengths[:, None] + jnp.arange(T)[None]
    lg, _, cache = model(cache, jnp.asarray([chunk]), pos, jnp.tril(jnp.ones((T, T), bool)))
    cache = advance(cache, jnp.asarray([T]))
    out.append(np.asarray(lg[0]))
  np.testing.assert_allclose(np.concatenate(out), full, atol=2e-5, rtol=1e-4)


def test_tree_forward_matches_each_path_and_commit_keeps_path():
  """A tree of two branches in one forward gives each branch its chain logits; committing one
  branch leaves the cache as if only that branch had been fed."""
  model = _model(seed=2)
  prefix = [5, 6, 7]
  # tree: root r=10 (depth 0) with children a=11, b=12 (depth 1); a has child c=13 (depth 2)
  tokens = [10, 11, 12, 13]
  parents = [-1, 0, 0, 1]
  depth = [0, 1, 1, 2]
  T = len(tokens)
  mask = np.eye(T, dtype=bool)
  for i in range(T):
    p = parents[i]
    while p >= 0:
      mask[i, p] = True
      p = parents[p]
  cache = init_cache(model.config, 1, 64)
  _, _, cache = model(cache, jnp.asarray([prefix]), jnp.arange(3)[None], jnp.tril(jnp.ones((3, 3), bool)))
  cache = advance(cache, jnp.asarray([3]))
  lg, _, tcache = model(cache, jnp.asarray([tokens]), 3 + jnp.asarray([depth]), jnp.asarray(mask))
  chain_a = _full_logits(model, prefix + [10, 11, 13])
  chain_b = _full_logits(model, prefix + [10, 12])
  np.testing.assert_allclose(np.asarray(lg[0, [0, 1, 3]]), chain_a[3:], atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(lg[0, 2]), chain_b[4], atol=2e-5, rtol=1e-4)
  # commit the path r, b (scratch slots 0, 2), then feed one more token
  kept = commit(tcache, jnp.asarray([[0, 2]]), jnp.asarray([2]))
  assert int(kept.lengths[0]) == 5
  lg2, _, _ = model(kept, jnp.asarray([[20]]), jnp.asarray([[5]]), jnp.ones((1, 1), bool))
  ref = _full_logits(model, prefix + [10, 12, 20])
  np.testing.assert_allclose(np.asarray(lg2[0, 0]), ref[-1], atol=2e-5, rtol=1e-4)


def test_ragged_batch_rows_are_independent():
  model = _model(seed=3)
  a, b = [4, 5, 6, 7, 8], [9, 10]
  cache = init_cache(model.config, 2, 64)
  toks = jnp.asarray([a, b + [0, 0, 0]])
  lg, _, cache = model(cache, toks, jnp.arange(5)[None].repeat(2, 0), jnp.tril(jnp.ones((5, 5), bool)))
  cache = advance(cache, jnp.asarray([5, 2]))
  lg2, _, _ = model(cache, jnp.asarray([[11], [12]]), cache.lengths[:, None], jnp.ones((1, 1), bool))
  np.testing.assert_allclose(np.asarray(lg2[0, 0]), _full_logits(model, a + [11])[-1], atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(lg2[1, 0]), _full_logits(model, b + [12])[-1], atol=2e-5, rtol=1e-4)


def test_capture_hidden_and_logits_index():
  model = _model(seed=4)
  cache = init_cache(model.config, 1, 32)
  toks = jnp.asarray([[3, 4, 5]])
  lg, hidden, _ = model(cache, toks, jnp.arange(3)[None], jnp.tril(jnp.ones((3, 3), bool)), capture=(0, -1))
  assert set(hidden) == {0, model.config.num_layers - 1}
  assert hidden[0].shape == (1, 3, model.config.embed_dim)
  lg1, _, _ = model(cache, toks, jnp.arange(3)[None], jnp.tril(jnp.ones((3, 3), bool)),
                    logits_index_BxN=jnp.asarray([[2]]))
  np.testing.assert_allclose(np.asarray(lg1[0, 0]), np.asarray(lg[0, 2]), atol=1e-6)


def test_cache_free_forward_equals_the_decode_forward_and_is_differentiable():
  """model(None, ...) is the training forward: same logits as a forward into an empty cache, per
  row masks [B, T, T] included, and gradients flow."""
  b = make_tiny_bundle(seed=5, qkv_bias=True)
  model = nnx.merge(b.graphdef, b.params)
  B, T = 3, 7
  toks = jax.random.randint(jax.random.key(1), (B, T), 0, b.config.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  causal = jnp.tril(jnp.ones((T, T), bool))
  want, _, _ = model(init_cache(b.config, B, 32), toks, pos, causal)
  got, _, cache = model(None, toks, pos)  # mask None = causal
  assert cache is None
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # per-row masks: row 1 sees only itself at every position after 3 (its own pattern)
  rows = jnp.stack([causal, causal & (jnp.arange(T)[None, :] >= jnp.where(jnp.arange(T)[:, None] > 3, jnp.arange(T)[:, None], 0)), causal])
  per_row, _, _ = model(None, toks, pos, rows)
  np.testing.assert_allclose(np.asarray(per_row[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(per_row[1, 4:]), np.asarray(want[1, 4:]), atol=1e-4)
  for r in range(B):
    one, _, _ = model(None, toks[r:r + 1], pos[r:r + 1], rows[r])
    np.testing.assert_allclose(np.asarray(per_row[r]), np.asarray(one[0]), rtol=1e-5, atol=1e-5)

  def loss(params):
    logits, _, _ = nnx.merge(b.graphdef, params)(None, toks, pos)
    return jax.nn.logsumexp(logits, axis=-1).mean()

  grads = jax.grad(loss)(b.params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert np.abs(np.asarray(grads["blocks"][0]["attn"]["q_ExHD"][...])).max() > 0


def test_edit_rewrites_the_residual_stream_at_a_layer():
  """An edit after block 0 that replaces the last position's state: that position's logits
  change, earlier positions' do not (causal), and capture sees the edited stream."""
  b = make_tiny_bundle(seed=6, layers=3)
  model = nnx.merge(b.graphdef, b.params)
  toks = jnp.asarray([[3, 4, 5, 6]])
  pos = jnp.arange(4)[None]
  plain, h_plain, _ = model(None, toks, pos, capture=(0,))
  pseudo_E = jnp.ones((b.config.embed_dim,)) * 0.5
  edit = lambda i, x: x.at[:, -1].set(pseudo_E) if i == 0 else x
  edited, h, _ = model(None, toks, pos, capture=(0,), edit=edit)
  np.testing.assert_allclose(np.asarray(h[0][0, -1]), np.asarray(pseudo_E))
  np.testing.assert_allclose(np.asarray(edited[:, :3]), np.asarray(plain[:, :3]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(edited[:, 3]), np.asarray(plain[:, 3]), atol=1e-4)


def test_read_only_forward_then_write_new_equals_the_writing_forward():
  """write_cache=False returns the new tokens' K/V (None for blocks not run); writing them with
  write_new gives the cache the writing forward gives, and the logits are the same."""
  bundle = make_tiny_bundle(seed=2)
  model = nnx.merge(bundle.graphdef, bundle.params)
  rng = np.random.default_rng(0)
  cache = init_cache(bundle.config, 2, 32)
  cache = cache.replace(k=tuple(jnp.asarray(rng.standard_normal(k.shape), k.dtype) for k in cache.k),
                        v=tuple(jnp.asarray(rng.standard_normal(v.shape), v.dtype) for v in cache.v),
                        lengths=jnp.asarray([5, 11], jnp.int32))
  tokens = jnp.asarray(rng.integers(0, bundle.config.vocab_size, (2, 3)), jnp.int32)
  pos, mask = cache.lengths[:, None] + jnp.arange(3)[None], jnp.tril(jnp.ones((3, 3), bool))
  want_logits, _, want_cache = model(cache, tokens, pos, mask)
  logits, _, new = model(cache, tokens, pos, mask, write_cache=False)
  assert all(k.shape == (2, bundle.config.num_kv_heads, 3, bundle.config.head_dim) for k in new.k)
  got_cache = write_new(cache, new)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-6, atol=1e-6)
  for got, want in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _, _, upper = model(cache, None, pos, mask, write_cache=False, start_layer=1,
                      inputs_BxTxE=jnp.ones((2, 3, bundle.config.embed_dim)))
  assert upper.k[0] is None and all(k is not None for k in upper.k[1:])
