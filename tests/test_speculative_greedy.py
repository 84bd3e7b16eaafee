"""Greedy speculative decoding is token-identical to greedy AR on real dev prompts with the real
default model (SmolLM2-135M), batch 1 and batch 3, for every train-free method and template."""

import pytest

import jaxspec
from conftest import dev_prompts

MAX_NEW = 20
CACHE_LEN = 256  # one cache size for every call: the decode loop compiles once per method config


@pytest.fixture(scope="module")
def prompts(smollm2):
  """8 dev prompts from mixed categories whose chat-templated length fits one prompt bucket range."""
  out = []
  for p in dev_prompts(240):
    n = len(jaxspec.encode_prompts(smollm2, [p])[0])
    if 40 <= n <= 96:
      out.append(p)
    if len(out) == 8:
      break
  assert len(out) == 8
  return out


@pytest.fixture(scope="module")
def ar_reference(smollm2, prompts):
  return [jaxspec.generate(smollm2, [p], max_new_tokens=MAX_NEW, cache_len=CACHE_LEN).token_ids[0]
          for p in prompts]


METHODS = [("pld", {}), ("draft", dict(k=3)), ("draft", dict(k=2, width=2))] + [
    ("recycling", dict(template=t)) for t in ("tiny", "small", "medium", "large", "xl", "xxl")]


@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in METHODS])
def test_greedy_identical_to_ar(smollm2, prompts, ar_reference, method, opts):
  kw = dict(method=method, method_options=opts, max_new_tokens=MAX_NEW, cache_len=CACHE_LEN)
  single = [jaxspec.generate(smollm2, [p], **kw).token_ids[0] for p in prompts]
  assert single == ar_reference
  batched = []
  for i in range(0, 8, 3):
    group = prompts[i:i + 3]
    group += prompts[: 3 - len(group)]  # keep batch 3 (one compilation)
    batched += jaxspec.generate(smollm2, group, **kw).token_ids[: len(prompts[i:i + 3])]
  assert batched == ar_reference
