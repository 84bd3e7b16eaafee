"""Weights in one huge-page host block: same values, one contiguous block, same forward."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import make_tiny_bundle
from jaxspec.models.host_arena import ALIGN, into_huge_pages
from jaxspec.models.kv_cache import init_cache


def _forward(bundle, params):
  model = nnx.merge(bundle.graphdef, params)
  cache = init_cache(bundle.config, 1, 32, jnp.float32)
  tokens = jnp.asarray([[3, 9, 4, 17, 5]], jnp.int32)
  pos = jnp.arange(5)[None]
  return np.asarray(model(cache, tokens, pos, jnp.tril(jnp.ones((5, 5), bool)))[0])


def test_state_moves_into_one_block_with_identical_values_and_forward():
  b = make_tiny_bundle(seed=3, qkv_bias=True)
  before_logits = _forward(b, b.params)
  before = [np.array(x) for x in jax.tree.leaves(b.params)]
  old_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(b.params)}
  params = into_huge_pages(b.params)
  assert params is b.params  # an nnx.State is updated in place
  gc.collect()  # the old buffers are gone; the block must be kept alive by the new arrays alone
  after = jax.tree.leaves(params)
  assert len(after) == len(before)
  for x, y in zip(before, after):
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y), x)
  ptrs = sorted(y.unsafe_buffer_pointer() for y in after)
  assert not old_ptrs & set(ptrs)  # really moved
  assert all(p % ALIGN == 0 for p in ptrs)
  padded = sum(-(-y.nbytes // ALIGN) * ALIGN for y in after)
  assert ptrs[-1] - ptrs[0] < padded  # one block: the tensors sit back to back
  np.testing.assert_array_equal(_forward(b, params), before_logits)


def test_plain_pytrees_and_what_it_leaves_alone():
  tree = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": [jnp.ones(5, jnp.int32)]}
  moved = into_huge_pages(tree)
  assert jax.tree.structure(moved) == jax.tree.structure(tree)
  np.testing.assert_array_equal(np.asarray(moved["a"]), np.arange(12).reshape(3, 4))
  assert moved["b"][0].dtype == jnp.int32
  not_arrays = {"a": np.ones(3), "b": 2.0}  # host values: nothing to move
  assert into_huge_pages(not_arrays) is not_arrays
  assert into_huge_pages({}) == {}


def test_loaded_bundle_uses_the_block_on_cpu(smollm2):
  assert smollm2.huge_pages == (jax.default_backend() == "cpu")
  if smollm2.huge_pages:
    ptrs = sorted(x.unsafe_buffer_pointer() for x in jax.tree.leaves(smollm2.params))
    assert ptrs[-1] - ptrs[0] < smollm2.param_bytes + ALIGN * len(ptrs)
