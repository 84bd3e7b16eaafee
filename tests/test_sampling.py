import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import InvalidOptionError
from jaxspec.sampling import SamplingConfig, sample_tokens, target_logprobs, vocab_argmax


def test_top_k_and_top_p_support():
  logits = jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1]))
  p = np.exp(np.asarray(target_logprobs(logits, SamplingConfig(1.0, top_k=2))))
  np.testing.assert_allclose(p, [4 / 7, 3 / 7, 0, 0], atol=1e-6)
  p = np.exp(np.asarray(target_logprobs(logits, SamplingConfig(1.0, top_p=0.65))))
  np.testing.assert_allclose(p, [4 / 7, 3 / 7, 0, 0], atol=1e-6)  # 0.4 < 0.65, 0.4+0.3 >= 0.65
  p = np.exp(np.asarray(target_logprobs(logits, SamplingConfig(1.0, top_p=0.4))))
  np.testing.assert_allclose(p, [1, 0, 0, 0], atol=1e-6)
  p = np.exp(np.asarray(target_logprobs(logits, SamplingConfig(0.5))))
  np.testing.assert_allclose(p, np.array([16, 9, 4, 1]) / 30, atol=1e-6)


def test_vocab_argmax_is_argmax_with_the_lowest_index_on_ties():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 4099)).astype(np.float32)
  x[0, 0, [7, 4000]] = 9.0  # a tie: the lower index wins
  x[0, 1, 4098] = 9.0  # the last index
  x[1, 2, :] = -np.inf  # masked row (top-k / top-p cut everything): index 0, like jnp.argmax
  x[1, 3, 5:] = -np.inf
  x[2, 4, :] = 1.5  # constant row
  x = jnp.asarray(x)
  want = np.asarray(jnp.argmax(x, axis=-1))
  got = np.asarray(jax.jit(vocab_argmax)(x))
  np.testing.assert_array_equal(got, want)
  assert got[0, 0] == 7 and got[0, 1] == 4098 and got[2, 4] == 0
  assert got.dtype == np.int32
  np.testing.assert_array_equal(vocab_argmax(x.astype(jnp.bfloat16)), jnp.argmax(x.astype(jnp.bfloat16), axis=-1))


def test_samples_follow_target_distribution():
  from scipy.stats import chisquare
  logits = jnp.asarray([1.0, 0.5, 0.0, -0.5, -2.0])
  cfg = SamplingConfig(0.8, top_k=4)
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, cfg))(keys))
  p = np.exp(np.asarray(target_logprobs(logits, cfg)))
  counts = np.bincount(draws, minlength=5)
  assert counts[4] == 0
  p64 = p[:4].astype(np.float64)
  expected = p64 / p64.sum() * counts.sum()
  assert chisquare(counts[:4], expected).pvalue > 1e-3


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                dict(temperature=float("nan"))])
def test_invalid_sampling_values(kw):
  with pytest.raises(InvalidOptionError):
    SamplingConfig(**kw)
