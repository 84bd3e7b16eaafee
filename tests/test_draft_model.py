"""Draft-model speculation with a separate drafter (its own cache in the method state): greedy
output equals AR, a drafter identical to the target is always accepted (its cache stays in step),
sampling keeps the AR distribution, and a drafter with another vocabulary is refused."""

import pytest

import jaxspec
from conftest import ToyTokenizer, make_tiny_bundle
from decoding_checks import exact_distribution, gof_pvalue, peaked_tiny_bundle, sample_counts
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import draft_model
from jaxspec.sampling import SamplingConfig

PROMPTS = [[5, 9, 2, 7, 3], [4, 4, 8], [3, 6, 2, 9, 11, 12, 6, 2, 2, 30, 40]]


@pytest.fixture
def drafters():
  """Register tiny drafter bundles under names for a target (no model folder)."""
  return lambda target, name, bundle: draft_model.register_drafter(target, name, bundle)


def _ar(bundle, prompts, n=16):
  return jaxspec.generate(bundle, prompts, max_new_tokens=n).token_ids


@pytest.mark.parametrize("opts", [dict(k=3), dict(k=2, width=2)])
def test_separate_drafter_greedy_identical_to_ar(drafters, opts):
  target = make_tiny_bundle(seed=0, layers=2)
  drafters(target, "tiny-drafter", make_tiny_bundle(seed=1, layers=1))  # a different, weaker model
  want = _ar(target, PROMPTS)
  got = jaxspec.generate(target, PROMPTS, method="draft", max_new_tokens=16,
                         method_options=dict(drafter="tiny-drafter", **opts)).token_ids
  assert got == want
  assert [jaxspec.generate(target, [p], method="draft", max_new_tokens=16,
                           method_options=dict(drafter="tiny-drafter", **opts)).token_ids[0] for p in PROMPTS] == want


def test_drafter_equal_to_target_is_always_accepted(drafters):
  """Same weights: every draft matches, so every step but the last commits k + 1 tokens. A drafter
  cache out of step with the accepted tokens would show up as rejections."""
  target = make_tiny_bundle(seed=2, layers=2, eos=())
  target.tokenizer.eos_token_id = None  # no early stop: the step count below is exact
  drafters(target, "same", target)
  r = jaxspec.generate(target, PROMPTS, method="draft", max_new_tokens=25, method_options=dict(drafter="same", k=4))
  assert r.token_ids == _ar(target, PROMPTS, 25)
  assert r.stats.steps == 5  # 25 tokens = prefill token + 4 steps x 5 + a last step of 4
  assert r.stats.accept_rates[:3] == [1.0, 1.0, 1.0]  # the last step is cut at the token budget


@pytest.mark.slow  # end-to-end sampling: thousands of rows per method, several compiles
def test_separate_drafter_sampling_matches_ar_distribution(drafters):
  sampling = SamplingConfig(temperature=0.8, top_k=6)
  target = peaked_tiny_bundle(seed=0, vocab=8, scale=40.0)
  drafters(target, "peaked-drafter", peaked_tiny_bundle(seed=5, vocab=8, scale=40.0))
  prompt = [1, 2, 3, 1, 2]
  P = exact_distribution(target, prompt, sampling)
  for opts in (dict(k=2, width=2, without_replacement=True),):  # a tree with q; chains: test_lossless_sampling
    counts, _ = sample_counts(target, prompt, sampling, "draft", dict(drafter="peaked-drafter", **opts), chunks=2)
    assert gof_pvalue(counts, P) > 1e-3


class _OtherVocab(ToyTokenizer):
  def get_vocab(self):
    return {f"x{i}": i for i in range(4096)}


def test_drafter_with_other_tokenizer_is_refused(drafters):
  target = make_tiny_bundle(seed=0)
  other = make_tiny_bundle(seed=1)
  other.tokenizer = _OtherVocab()
  drafters(target, "other", other)
  with pytest.raises(InvalidOptionError, match="different tokenizer"):
    jaxspec.generate(target, PROMPTS[:1], method="draft", max_new_tokens=4, method_options=dict(drafter="other"))
