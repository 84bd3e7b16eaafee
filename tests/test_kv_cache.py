import jax.numpy as jnp
import numpy as np

from jaxspec.models.config import ModelConfig
from jaxspec.models.kv_cache import advance, commit, init_cache, write_scratch


def test_write_commit_and_advance_per_row():
  c = ModelConfig(vocab_size=8, embed_dim=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=8)
  cache = init_cache(c, 2, 16)
  cache = cache.replace(lengths=jnp.asarray([3, 5]))
  new = jnp.arange(2 * 1 * 4 * 4, dtype=jnp.float32).reshape(2, 1, 4, 4) + 1  # [B, K, T=4, D]
  k = write_scratch(cache.k[0], new, cache.lengths)
  np.testing.assert_array_equal(k[0, 0, 3:7], new[0, 0])
  np.testing.assert_array_equal(k[1, 0, 5:9], new[1, 0])
  cache = cache.replace(k=(k,), v=(k,))
  kept = commit(cache, jnp.asarray([[0, 2, 3], [1, 3, 0]]), jnp.asarray([3, 2]))
  np.testing.assert_array_equal(np.asarray(kept.lengths), [6, 7])
  np.testing.assert_array_equal(kept.k[0][0, 0, 3:6], new[0, 0, jnp.asarray([0, 2, 3])])
  np.testing.assert_array_equal(kept.k[0][1, 0, 5:7], new[1, 0, jnp.asarray([1, 3])])
  np.testing.assert_array_equal(kept.k[0][0, 0, :3], 0)  # committed prefix untouched
  adv = advance(cache, jnp.asarray([1, 0]))
  np.testing.assert_array_equal(np.asarray(adv.lengths), [4, 5])
  assert adv.k[0] is cache.k[0]  # AR commit moves no data
