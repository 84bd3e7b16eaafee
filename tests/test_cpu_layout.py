"""models.cpu_layout: the [out, in] weight copies give the same logits as the canonical layout for
few-token forwards (the `_T` path of `linear`) and AR forwards (which keep [in, out])."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_bundle
from jaxspec.models.cpu_layout import add_transposed_weights, strip_transposed_weights
from jaxspec.models.kv_cache import init_cache
from flax import nnx


@pytest.mark.parametrize("T", [1, 5])
def test_transposed_layout_gives_the_same_logits(T):
  b = make_tiny_bundle(seed=3, qkv_bias=True)
  g2, p2 = add_transposed_weights(b.graphdef, b.params)
  names = {str(k[-1]) for k, _ in nnx.to_flat_state(p2)}
  assert {"q_ExHD_T", "down_FxE_T"} <= names
  toks = jax.random.randint(jax.random.key(0), (2, T), 0, b.config.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (2, T))
  mask = jnp.tril(jnp.ones((T, T), bool))
  run = lambda g, p: nnx.merge(g, p)(init_cache(b.config, 2, 32), toks, pos, mask)[0]
  want, got = np.asarray(run(b.graphdef, b.params)), np.asarray(run(g2, p2))
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  stripped = strip_transposed_weights(p2)
  assert {str(k[-1]) for k, _ in nnx.to_flat_state(stripped)} == {str(k[-1]) for k, _ in nnx.to_flat_state(b.params)}
