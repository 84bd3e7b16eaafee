"""AR engine on a random small model: greedy == naive recompute, batching, EOS, budgets,
reproducible sampling, streaming, stop strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import jit_forward
from jaxspec.models.kv_cache import init_cache

PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16]]


def naive_greedy(bundle, prompt, n, eos=1):
  fwd = jit_forward(bundle)
  ids, out = list(prompt), []
  W = 32  # fixed padded width: one compilation
  for _ in range(n):
    T = len(ids)
    lg, _, _ = fwd(init_cache(bundle.config, 1, 64), jnp.asarray([ids + [0] * (W - T)]), jnp.arange(W)[None],
                   jnp.tril(jnp.ones((W, W), bool)))
    t = int(jnp.argmax(lg[0, T - 1]))
    if t == eos:
      break
    out.append(t)
    ids.append(t)
  return out


def test_greedy_matches_naive_and_batch_matches_single(tiny):
  batch = jaxspec.generate(tiny, PROMPTS, max_new_tokens=12)
  for i, p in enumerate(PROMPTS):
    assert batch.token_ids[i] == naive_greedy(tiny, p, 12)
    assert jaxspec.generate(tiny, [p], max_new_tokens=12).token_ids[0] == batch.token_ids[i]
  s = batch.stats
  assert s.tokens_per_forward == pytest.approx(1.0)
  assert all(n <= 12 for n in s.new_tokens)


def test_eos_and_budget(tiny):
  import dataclasses
  free = jaxspec.generate(tiny, PROMPTS, max_new_tokens=12).token_ids
  # make a token of row 2 that row 0 never produces the EOS: row 2 must stop there, row 0 runs on
  eos = next(t for t in free[2][2:] if t not in free[0])
  bundle = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, eos_token_ids=(eos,)))
  out = jaxspec.generate(bundle, PROMPTS, max_new_tokens=12)
  lens = [len(t) for t in out.token_ids]
  assert out.token_ids[2] == free[2][:free[2].index(eos)] and lens[0] == 12
  assert out.stats.new_tokens[2] == lens[2] + 1  # EOS counts as a generated token
  one = jaxspec.generate(tiny, PROMPTS, max_new_tokens=1)
  assert [len(t) for t in one.token_ids] == [1, 1, 1] and one.stats.steps == 0


def test_sampling_is_reproducible_and_seed_dependent(tiny):
  kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
  a = jaxspec.generate(tiny, PROMPTS, seed=3, **kw).token_ids
  b = jaxspec.generate(tiny, PROMPTS, seed=3, **kw).token_ids
  c = jaxspec.generate(tiny, PROMPTS, seed=4, **kw).token_ids
  assert a == b and a != c


def test_stream_yields_generate_text(tiny):
  full = jaxspec.generate(tiny, [PROMPTS[0]], max_new_tokens=10).texts[0]
  pieces = list(jaxspec.stream(tiny, PROMPTS[0], max_new_tokens=10))
  assert len(pieces) > 1 and "".join(pieces) == full


def test_stop_strings_cut_text_and_stop_early(tiny):
  full = jaxspec.generate(tiny, [PROMPTS[0]], max_new_tokens=40)
  words = full.texts[0].split()
  stop = " " + words[3]
  cut = jaxspec.generate(tiny, [PROMPTS[0]], max_new_tokens=40, stop=[stop])
  assert cut.texts[0] == full.texts[0][: full.texts[0].find(stop)]
  assert cut.stats.steps < full.stats.steps


def test_pure_functions_compose_under_jit(tiny):
  """The low-level API: init_state -> prefill -> run_steps, all pure and jittable by the caller."""
  from jaxspec import engine
  from jaxspec.methods import get_method
  m = get_method("ar")
  P, S, steps = engine.plan_sizes([5], 8, m, 512)
  st = engine.init_state(tiny.config, [PROMPTS[0]], 8, m, jax.random.key(0), S, steps, jnp.float32)
  cfg = jaxspec.SamplingConfig()
  st = engine.prefill_jit(tiny.params, st, graphdef=tiny.graphdef, prompt_len=P, sampling=cfg, eos_ids=(1,))
  st = engine.run_steps_jit(tiny.params, st, jnp.asarray(100), graphdef=tiny.graphdef, method=m, sampling=cfg,
                            eos_ids=(1,))
  ids = np.asarray(st.tokens[0, 5:int(st.num_tokens[0])]).tolist()
  assert ids == naive_greedy(tiny, PROMPTS[0], 8)


def test_new_max_new_tokens_compiles_nothing(tiny):
  """No state shape depends on max_new_tokens (the step budget is a value): within one cache
  bucket a second call with another budget reuses prefill and loop."""
  first = jaxspec.generate(tiny, PROMPTS, max_new_tokens=9, cache_len=128)
  second = jaxspec.generate(tiny, PROMPTS, max_new_tokens=13, cache_len=128)
  assert first.stats.compile_s > 0 and second.stats.compile_s == 0.0
  assert max(len(t) for t in second.token_ids) == 13
  assert all(a == b[:len(a)] for a, b in zip(first.token_ids, second.token_ids))


def test_stream_with_stop_string_equals_generate(tiny):
  full = jaxspec.generate(tiny, [PROMPTS[0]], max_new_tokens=40).texts[0]
  stop = " " + full.split()[5] + " "  # spans pieces: held back until it is known not to be a stop
  want = jaxspec.generate(tiny, [PROMPTS[0]], max_new_tokens=40, stop=[stop]).texts[0]
  got = list(jaxspec.stream(tiny, PROMPTS[0], max_new_tokens=40, stop=[stop]))
  assert "".join(got) == want == full[:full.find(stop)]


class _ByteTokenizer:
  """ids are UTF-8 bytes: a character may span several tokens."""

  def decode(self, ids, skip_special_tokens=True):
    return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenization_holds_back_partial_characters():
  from jaxspec.api import _TextTail
  text = "héllo 日本 🙂!"
  tail = _TextTail(_ByteTokenizer())
  data = list(text.encode())
  pieces = [tail.push([b], final=i == len(data) - 1) for i, b in enumerate(data)]
  assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
  assert len(tail.ids) - tail.prefix <= 4  # only a short window of the newest tokens is decoded


def test_compiled_cache_keeps_the_most_recently_used_executables():
  from jaxspec.engine import CompiledCache
  cache = CompiledCache(max_entries=2)
  f = jax.jit(lambda x: x * 2)
  args = {n: (jnp.ones((n,)),) for n in (1, 2, 3)}
  compile_s = lambda n: cache.get(f, args[n], {})[1]
  assert compile_s(1) > 0 and compile_s(2) > 0
  assert compile_s(1) == 0.0  # reused, and now the most recent
  assert compile_s(3) > 0 and len(cache) == 2  # 2 was the least recently used: dropped
  assert compile_s(1) == 0.0
  assert compile_s(2) > 0
  exe, _ = cache.get(f, args[3], {})
  np.testing.assert_array_equal(exe(*args[3]), 2 * np.ones(3))
  cache.clear()
  assert len(cache) == 0
