"""Speculative Jacobi Decoding: at temperature 0 exactly `jacobi` (same tokens, same steps);
under sampling the AR distribution for several init strategies and with temperature, top-k and
top-p (chi-square against the exact distribution of the first 3 tokens of a small random
model, vocab 16); a wrong acceptance rule fails the same test."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import make_tiny_bundle
from decoding_checks import exact_distribution, gof_pvalue, peaked_tiny_bundle, sample_counts
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import get_method
from jaxspec.methods.sjd import SJD
from jaxspec.sampling import SamplingConfig
from jaxspec.verify import verify_stochastic

TINY_PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4], [10, 11, 12, 13, 14, 15, 16]]


@pytest.mark.parametrize("options", [dict(init="prompt"), dict(init="above", w=3)])
def test_temperature_zero_is_jacobi(options):
  b = make_tiny_bundle(vocab=32)
  ref = jaxspec.generate(b, TINY_PROMPTS, max_new_tokens=24).token_ids
  jac = jaxspec.generate(b, TINY_PROMPTS, method="jacobi", method_options=dict(n=6, **options), max_new_tokens=24)
  sjd = jaxspec.generate(b, TINY_PROMPTS, method="sjd", method_options=dict(L=6, **options), max_new_tokens=24)
  assert sjd.token_ids == jac.token_ids == ref
  assert sjd.stats.steps == jac.stats.steps and sjd.stats.accept_hist == jac.stats.accept_hist
  assert sjd.stats.forwards == jac.stats.forwards


@pytest.fixture(scope="module")
def peaked():
  b = peaked_tiny_bundle()
  seed_prompt = [3, 7, 2]
  prompt = seed_prompt + jaxspec.generate(b, [seed_prompt], max_new_tokens=21, temperature=1.0, seed=5).token_ids[0]
  return b, prompt


@pytest.mark.slow  # end-to-end sampling: thousands of rows per method, several compiles
@pytest.mark.parametrize("sampling,options", [
    (SamplingConfig(1.0), dict(L=6, init="random")),
    (SamplingConfig(0.8, top_k=8, top_p=0.9), dict(L=6, init="prompt")),
    (SamplingConfig(1.0), dict(L=6, init="left", w=4)),
])
def test_sampling_matches_exact_distribution(peaked, sampling, options):
  b, prompt = peaked
  P = exact_distribution(b, prompt, sampling)
  counts, stats = sample_counts(b, prompt, sampling, "sjd", options, rows=1500, chunks=2)
  assert stats.tokens_per_forward > 1.0
  assert gof_pvalue(counts, P) > 1e-3


@dataclasses.dataclass(frozen=True)
class NaiveSJD(SJD):
  """SJD with a wrong rule (resample from p, not the residual), injected by the test."""

  def verify(self, draft, logits_BxTxV, sampling, key, target=None):
    if sampling.greedy:
      return super().verify(draft, logits_BxTxV, sampling, key, target)
    return verify_stochastic(self.tree, draft, logits_BxTxV, sampling, key, accept_rule="naive")


@pytest.mark.slow  # end-to-end sampling: thousands of rows per method, several compiles
def test_wrong_rule_is_detected(peaked):
  b, prompt = peaked
  sampling = SamplingConfig(1.0)
  P = exact_distribution(b, prompt, sampling)
  counts, _ = sample_counts(b, prompt, sampling, NaiveSJD(L=6, init="random"), rows=1500, chunks=2)
  assert gof_pvalue(counts, P) < 1e-6


def test_q_of_fresh_slots_is_the_init_distribution():
  """Drafts and their q: uniform for random init, prompt histogram for prompt init, one-hot for copies."""
  from jaxspec import engine
  b = make_tiny_bundle(vocab=16)
  prompt = [2, 2, 3, 5]
  for init, check in [("random", lambda q, t: np.allclose(q, 1 / 16)),
                      ("prompt", lambda q, t: np.allclose(q, np.bincount(prompt, minlength=16) / 4)),
                      ("repeat", lambda q, t: q[t] == 1.0 and q.sum() == 1.0)]:
    m = get_method("sjd", L=4, init=init)
    P, S, steps = engine.plan_sizes([4], 8, m, 512)
    st = engine.init_state(b.config, [prompt], 8, m, None, S, steps, jnp.float32)
    st = st.replace(num_tokens=st.num_tokens + 1)
    model = type("M", (), {"config": b.config})()
    d, _ = m.propose(model, None, st, SamplingConfig(1.0), jax.random.key(0))
    toks, q = np.asarray(d.tokens[0]), np.asarray(d.q_probs[0])
    for i in range(1, 4):
      assert check(q[i], toks[i]), (init, i)
      assert q[i, toks[i]] > 0


def test_bad_options_raise():
  for opts in (dict(L=1), dict(init="left"), dict(n=3)):
    with pytest.raises(InvalidOptionError):
      get_method("sjd", **opts)
