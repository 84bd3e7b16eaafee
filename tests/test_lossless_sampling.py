"""End-to-end: every speculative method's sampled output has the AR sampling distribution
(first three tokens, exact enumeration on a small random model), and a wrong verification
rule is detected by the same test."""

import dataclasses

import jax.numpy as jnp
import pytest

from jaxspec.methods.hidden_transfer import HiddenTransfer
from jaxspec.methods.lud import LUD
from jaxspec.methods.prompt_lookup import PromptLookup
from jaxspec.sampling import SamplingConfig
from jaxspec.verify import verify_stochastic
from conftest import random_heads_folder
from decoding_checks import exact_distribution, gof_pvalue, lud_tuned_bundle, peaked_tiny_bundle, sample_counts

SAMPLING = SamplingConfig(temperature=0.8, top_k=6)
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats give prompt lookup drafts


@pytest.fixture(scope="module")
def setup():
  b = peaked_tiny_bundle(vocab=8, scale=40.0)
  return b, exact_distribution(b, PROMPT, SAMPLING)


@pytest.mark.slow  # end-to-end sampling: thousands of rows per method, several compiles
@pytest.mark.parametrize("method,opts", [
    ("ar", {}),
    ("pld", dict(k=3, max_ngram=2, cost=(1.0, 1.0, 1.0))),
    ("recycling", dict(template="small", adaptive=False)),
    ("recycling", dict(template="small", lookup=3, cost=(1.0, 1.0, 1.0))),  # lookup chain grafted, drafting forced
    ("draft", dict(k=2)),
    ("draft", dict(k=2, width=2)),
    ("draft", dict(k=2, width=2, without_replacement=True)),
])
def test_sampling_matches_ar_distribution(setup, method, opts):
  b, P = setup
  counts, stats = sample_counts(b, PROMPT, SAMPLING, method, opts)
  assert gof_pvalue(counts, P) > 1e-3
  if method != "ar":  # pay per draft with flat costs (or none): drafts were verified
    assert stats.mean_forward_size > 1.0


@pytest.mark.slow  # end-to-end sampling, as above: drafts from heads that often match (identity-like)
@pytest.mark.parametrize("opts", [dict(recycle=0), dict(recycle=4),  # depth 2 from the heads / the recycled matrix
                                  dict(recycle=4, dynamic=True, pool=8)])  # each row's most probable pool nodes
def test_hidden_transfer_sampling_matches_ar_distribution(setup, tmp_path, opts):
  b, P = setup
  heads = random_heads_folder(b, tmp_path / "heads", k=2, layer=1, noise=0.05)
  counts, stats = sample_counts(b, PROMPT, SAMPLING, "hidden_transfer", dict(heads=str(heads), nodes=4,
                                                                            cost=(1.0, 1.0, 1.0), **opts))
  assert stats.tokens_per_forward > 1.0  # drafts were accepted: the tree path was exercised
  assert gof_pvalue(counts, P) > 1e-3
  # the same drafts under a wrong rule are caught
  wrong = NaiveHiddenTransfer(heads=str(heads), nodes=4, cost=(1.0, 1.0, 1.0), **opts)
  counts, _ = sample_counts(b, PROMPT, SAMPLING, wrong)
  assert gof_pvalue(counts, P) < 1e-6


@dataclasses.dataclass(frozen=True)
class NaiveHiddenTransfer(HiddenTransfer):
  def verify(self, draft, logits_BxTxV, sampling, key, target=None):
    return verify_stochastic(self.tree, draft, logits_BxTxV, sampling, key, accept_rule="naive")


@dataclasses.dataclass(frozen=True)
class NaivePLD(PromptLookup):
  """Prompt lookup with a deliberately wrong verifier (resample from p, not the residual): a
  method of its own, so it compiles apart and nothing shared is patched."""

  def verify(self, draft, logits_BxTxV, sampling, key, target=None):
    return verify_stochastic(self.tree, draft, logits_BxTxV, sampling, key, accept_rule="naive")


@pytest.mark.slow  # end-to-end sampling: thousands of rows per method, several compiles
def test_wrong_rule_is_detected(setup):
  b, P = setup
  # flat costs: with the forward costs measured on a busy machine pay per draft may verify no
  # draft, and a wrong rule that never runs cannot be caught
  counts, stats = sample_counts(b, PROMPT, SAMPLING, NaivePLD(k=3, max_ngram=2, cost=(1.0, 1.0, 1.0)))
  assert stats.mean_forward_size > 1.0
  assert gof_pvalue(counts, P) < 1e-6


@dataclasses.dataclass(frozen=True)
class NaiveLUD(LUD):
  def verify(self, draft, logits_BxTxV, sampling, key, target=None):
    r_B = jnp.sum(draft.valid, axis=1) - (self.k - 1)
    drafted = draft.replace(valid=jnp.arange(self.k)[None, :] < r_B[:, None], tokens=draft.tokens[:, :self.k])
    return verify_stochastic(self.tree, drafted, logits_BxTxV[:, :self.k], sampling, key, accept_rule="naive")


@pytest.mark.slow  # end-to-end sampling, as above: LUD's verify mode on a model fine-tuned for it
def test_lud_verify_sampling_matches_ar_distribution(tmp_path):
  b, _, _, _ = lud_tuned_bundle(peaked_tiny_bundle(vocab=8, scale=40.0), tmp_path)
  P = exact_distribution(b, PROMPT, SAMPLING)
  opts = dict(adapters="none", placeholder=0, k=3, beta=0.05)
  counts, stats = sample_counts(b, PROMPT, SAMPLING, "lud", dict(opts, verify=True), max_new=6)
  assert stats.tokens_per_forward > 1.0  # drafts were accepted
  assert gof_pvalue(counts, P) > 1e-3
  counts, _ = sample_counts(b, PROMPT, SAMPLING, NaiveLUD(verify_drafts=True, **opts), max_new=6)
  assert gof_pvalue(counts, P) < 1e-6
