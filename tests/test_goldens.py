"""Our SmolLM2 forward and greedy decoding against Hugging Face transformers (torch) goldens.

Goldens come from experiments/make_goldens.py on the same converted folder (fp32)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import jit_forward
from jaxspec.models.kv_cache import init_cache

pytestmark = pytest.mark.slow  # the real model

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens", "smollm2-135m-instruct.json")


@pytest.fixture(scope="module")
def goldens():
  with open(GOLDENS) as f:
    return json.load(f)


def test_last_position_logits_match(smollm2, goldens):
  fwd = jit_forward(smollm2)
  worst = 0.0
  for case in goldens["prompts"]:
    ids = case["prompt_ids"]
    T = len(ids)
    P = -(-T // 32) * 32  # pad to a bucket: fewer compilations
    toks = jnp.asarray([ids + [0] * (P - T)])
    lg, _, _ = fwd(init_cache(smollm2.config, 1, P), toks, jnp.arange(P)[None], jnp.tril(jnp.ones((P, P), bool)),
                   jnp.asarray([[T - 1]]))
    ours = np.asarray(lg[0, 0])
    top_ids = np.asarray(case["top50_ids"])
    assert int(np.argmax(ours)) == int(top_ids[0]), case.get("name")
    worst = max(worst, float(np.max(np.abs(ours[top_ids] - np.asarray(case["top50_logits"])))))
  assert worst < 2e-3, f"max |logit diff| over top-50 = {worst}"


def test_greedy_continuations_match(smollm2, goldens):
  cases = goldens["prompts"]
  out = jaxspec.generate(smollm2, [c["prompt_ids"] for c in cases], max_new_tokens=32)
  eos = set(smollm2.eos_ids)
  for case, got in zip(cases, out.token_ids):
    want = [t for t in case["greedy_ids"] if t not in eos]
    assert got == want, case.get("name")


def test_capital_of_france(smollm2):
  out = jaxspec.generate(smollm2, ["The capital of France is"], max_new_tokens=32, chat=False)
  assert "Paris" in out.texts[0]
