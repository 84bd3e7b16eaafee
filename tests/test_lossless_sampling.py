"""End-to-end: every speculative method's sampled output has the AR sampling distribution
(first three tokens, exact enumeration on a small random model), and a wrong verification
rule is detected by the same test."""

import numpy as np
import pytest

from jaxspec import verify as verify_mod
from jaxspec.sampling import SamplingConfig
from decoding_checks import exact_distribution, gof_pvalue, peaked_tiny_bundle, sample_counts

SAMPLING = SamplingConfig(temperature=0.8, top_k=6)
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats give prompt lookup drafts


@pytest.fixture(scope="module")
def setup():
  b = peaked_tiny_bundle(vocab=8, scale=40.0)
  return b, exact_distribution(b, PROMPT, SAMPLING)


@pytest.mark.parametrize("method,opts", [
    ("ar", {}),
    ("pld", dict(k=3, max_ngram=2)),
    ("recycling", dict(template="small")),
    ("draft", dict(k=2)),
    ("draft", dict(k=2, width=2)),
    ("draft", dict(k=2, width=2, without_replacement=True)),
])
def test_sampling_matches_ar_distribution(setup, method, opts):
  b, P = setup
  counts, _ = sample_counts(b, PROMPT, SAMPLING, method, opts)
  assert gof_pvalue(counts, P) > 1e-3


def test_wrong_rule_is_detected(setup, monkeypatch):
  b, P = setup
  real = verify_mod.verify_stochastic
  monkeypatch.setattr(verify_mod, "verify_stochastic",
                      lambda *a, **k: real(*a, **dict(k, accept_rule="naive")))
  import jax
  from jaxspec import engine
  engine.COMPILED._store.clear()
  jax.clear_caches()  # retrace with the wrong rule
  try:
    counts, _ = sample_counts(b, PROMPT, SAMPLING, "pld", dict(k=3, max_ngram=2))
  finally:
    engine.COMPILED._store.clear()
    jax.clear_caches()
  assert gof_pvalue(counts, P) < 1e-6
