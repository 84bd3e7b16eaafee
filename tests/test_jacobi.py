"""Jacobi decoding: init strategies give greedy AR's output on a small model (the real-model
identity test is tests/test_lossless_greedy.py), guesses carried between steps, option errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import make_tiny_bundle
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import get_method
from jaxspec.verify import Verdict

TINY_PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4], [10, 11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def tiny32():
  return make_tiny_bundle(vocab=32)


@pytest.mark.parametrize("options", [dict(init="pad", n=4), dict(init="prompt"), dict(init="left", w=4)])
def test_inits_match_greedy_ar(tiny32, options):
  ref = jaxspec.generate(tiny32, TINY_PROMPTS, max_new_tokens=24).token_ids
  out = jaxspec.generate(tiny32, TINY_PROMPTS, method="jacobi", method_options=options, max_new_tokens=24)
  assert out.token_ids == ref
  s = out.stats
  assert sum(s.accept_hist) == sum(f - 1 for f in s.forwards)  # one histogram entry per active step


def test_guesses_are_carried_shifted():
  m = get_method("jacobi", n=5)
  V = 20
  # argmax at slots 0..4 of two rows; row 0 accepted 1 guess (n=2), row 1 accepted none (n=1)
  am = np.array([[3, 4, 5, 6, 7], [11, 12, 13, 14, 15]])
  logits = jnp.asarray(np.eye(V)[am] * 3.0)
  verdict = Verdict(path=None, n=jnp.asarray([2, 1]), tokens=None)
  ms = m.update(m.init_method_state(type("C", (), {"vocab_size": V})(), 2, 0, None), None, None, logits, None,
                verdict, verdict.n)
  assert ms["carried"].tolist() == [3, 4]  # window 5 minus committed tokens
  # next slot j+1 takes the argmax at old slot n+j
  assert ms["guess"][0, :3].tolist() == [5, 6, 7]
  assert ms["guess"][1].tolist() == [12, 13, 14, 15]


def test_carried_guesses_fill_the_window_then_init(tiny32):
  from jaxspec import engine
  m = get_method("jacobi", n=5, init="pad", pad_token=9)
  P, S, steps = engine.plan_sizes([8], 8, m, 512)
  st = engine.init_state(tiny32.config, [TINY_PROMPTS[0]], 8, m, None, S, steps, jnp.float32)
  st = st.replace(num_tokens=st.num_tokens + 1)  # pending token = buffer position 8 (0)
  toks = m.fill_window(st, jnp.asarray([[21, 22, 23, 24]]), jnp.asarray([2]), jnp.zeros((2,), jnp.uint32), 32)
  assert toks[0].tolist() == [0, 21, 22, 9, 9]


def test_bad_options_raise():
  for opts in (dict(n=1), dict(init="nope"), dict(init="above"), dict(bogus=1)):
    with pytest.raises(InvalidOptionError):
      get_method("jacobi", **opts)
