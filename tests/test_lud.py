"""Lexical Unit Decoding on tiny models (seconds): mining finds planted units; the reconfigured
examples' masks, positions and targets are exactly METHODS.md's; LoRA merging; a tiny LUD
fine-tune learns its units, after which lossy decoding commits several tokens per forward and
verify mode equals the model's own AR with drafts accepted; lossy with beta > 1 is AR."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import make_tiny_bundle
from decoding_checks import lud_tuned_bundle, peaked_tiny_bundle
from jaxspec.errors import HeadsFileError, InvalidOptionError
from jaxspec.train import lora
from jaxspec.train.lud import canonical
from jaxspec.train.lud_data import reconfigure
from jaxspec.train.lud_units import mine_units, token_confidence, unit_stats


def test_mining_finds_planted_units():
  n = 14
  p = np.full(n, 0.3, np.float32)
  p[[2, 3, 4]] = 0.95  # a planted unit of 3
  p[[7, 8, 9, 10, 11]] = 0.9  # a run of 5: cut at k = 4
  am = np.ones(n, bool)
  am[3] = True
  units = mine_units(p, am, alpha=0.8, k=4)
  assert (2, 3) in units and (7, 4) in units and (11, 1) in units
  assert sum(l for _, l in units) == n - 1 and units[0][0] == 1  # tiles 1..n-1 in order
  am[3] = False  # not the argmax: the unit breaks
  assert (2, 1) in mine_units(p, am, 0.8, 4) and (4, 1) in mine_units(p, am, 0.8, 4)
  stats = unit_stats([units], 4)
  assert stats["length_hist"][3] == 1 and stats["length_hist"][4] == 1
  assert stats["share_in_multi_token_units"] == pytest.approx(7 / 13)


def test_token_confidence_is_the_teacher_forced_probability():
  b = make_tiny_bundle(vocab=32)
  seq = [3, 9, 4, 11, 7, 2, 30]
  (p, am), = token_confidence(b, [seq], batch_size=1, progress=False)
  logits, _, _ = b.model()(None, jnp.asarray([seq]), jnp.arange(len(seq))[None], None)
  probs = np.asarray(jax.nn.softmax(logits[0], axis=-1))
  np.testing.assert_allclose(p[1:], probs[np.arange(6), seq[1:]], rtol=1e-5)
  assert p[0] == 0 and not am[0] and list(am[1:]) == list(probs.argmax(-1)[:6] == np.asarray(seq[1:]))


def test_reconfigured_example_is_what_methods_md_says():
  toks = [10, 11, 12, 13, 14, 15, 16, 17]
  units = [(1, 1), (2, 3), (5, 1), (6, 2)]  # multi-token units at 2 (3 long) and 6 (2 long)
  ex = reconfigure(toks, units, k=3, placeholder_id=99, window=8, budget=8, seed=0)
  n, T = 8, 16
  assert ex["mask"].shape == (T, T)
  # real tokens: positions 0..7, causal among themselves, never attending a placeholder, AR targets
  assert list(ex["tokens"][:n]) == toks and list(ex["positions"][:n]) == list(range(n))
  np.testing.assert_array_equal(ex["mask"][:n, :n], np.tril(np.ones((n, n), bool)))
  assert not ex["mask"][:n, n:].any()
  assert list(ex["targets"][:n - 1]) == toks[1:] and list(ex["weight"][:n]) == [1] * 7 + [0]
  ph = np.flatnonzero(ex["is_placeholder"])
  assert set(ex["tokens"][ph]) == {99}
  blocks = {}
  for s in ph:
    blocks.setdefault(int(ex["mask"][s, :n].sum()), []).append(s)  # unit start = real tokens seen
  # unit (2, 3): m = min(3, k-1) = 2 placeholders at positions 2, 3 -> targets y3, y4 (inside the unit)
  # unit (6, 2): m = min(2, 2, n-1-6) = 1 placeholder at position 6 -> target y7 (the unit's second token)
  # one single-token unit (as many as multi-token ones, seeded): one placeholder -> the boundary target
  for start, slots in blocks.items():
    assert list(ex["positions"][slots]) == list(range(start, start + len(slots)))
    assert list(ex["targets"][slots]) == toks[start + 1:start + 1 + len(slots)]
    for i, s in enumerate(slots):  # the real tokens before the unit, and its own block causally
      assert list(np.flatnonzero(ex["mask"][s])) == list(range(start)) + slots[:i + 1]
  assert sorted(len(v) for v in blocks.values())[-1] == 2 and {2, 6} <= set(blocks)
  assert len(blocks) == 4  # two multi-token units + two single-token ones (all there are)
  pad = [i for i in range(n, T) if i not in ph]
  assert all(list(np.flatnonzero(ex["mask"][i])) == [i] for i in pad) and not ex["weight"][pad].any()


def test_lora_merge():
  b = make_tiny_bundle(tie=True)
  _, params = canonical(b)
  ad = lora.init_lora(jax.random.key(0), params, rank=2)
  same = lora.merge(params, ad, 2.0)  # B = 0: the base model exactly
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ad = {k: (v if k.endswith(".A") else 0.1 * jnp.ones_like(v)) for k, v in ad.items()}
  ad["rows.5"] = jnp.arange(b.config.embed_dim, dtype=jnp.float32)
  merged = lora.merge(params, ad, 2.0)
  names, leaves, _ = lora.named_leaves(merged)
  w = dict(zip(names, leaves))
  base = dict(zip(*lora.named_leaves(params)[:2]))
  q = "blocks.1.attn.q_ExHD"
  np.testing.assert_allclose(w[q], base[q] + 2.0 * ad[q + ".A"] @ ad[q + ".B"], rtol=1e-6)
  np.testing.assert_array_equal(w["embed_VxE"][5], np.arange(b.config.embed_dim))
  np.testing.assert_array_equal(w["embed_VxE"][4], base["embed_VxE"][4])
  # the CPU layout's [out, in] copies stay the transpose of the merged weights
  from jaxspec.models.cpu_layout import add_transposed_weights
  _, with_t = add_transposed_weights(b.graphdef, b.params)
  wt = dict(zip(*lora.named_leaves(lora.merge(with_t, ad, 2.0))[:2]))
  np.testing.assert_allclose(wt[q + "_T"], np.asarray(w[q]).T, rtol=1e-6)
  with pytest.raises(InvalidOptionError, match="does not have"):
    lora.merge(params, {"blocks.9.attn.q_ExHD.A": ad[q + ".A"], "blocks.9.attn.q_ExHD.B": ad[q + ".B"]}, 1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A peaked tiny model fine-tuned for LUD (full mode) on its own continuations."""
  return lud_tuned_bundle(peaked_tiny_bundle(vocab=16, scale=30.0), tmp_path_factory.mktemp("lud"))


def test_lud_fine_tune_learns_the_units(trained):
  _, _, log, meta = trained
  losses = [r["unit_loss"] for r in log if "unit_loss" in r]
  top1 = [r["top1_unit"] for r in log if "top1_unit" in r]
  assert losses[-1] < 0.5 * losses[0] and top1[-1] > top1[0] + 0.2
  assert meta["eval"]["eval_top1_unit"] > 0.35 and meta["train"]["share_in_multi_token_units"] > 0.3
  assert meta["placeholder_id"] == 0 and meta["k"] == 3 and meta["kind"] == "lud_adapters"


def test_decoding_with_the_fine_tuned_model(trained):
  b, rows, _, _ = trained
  prompts = [r["prompt_ids"] for r in rows[:3]]  # ragged
  ar = jaxspec.generate(b, prompts, max_new_tokens=20)
  opts = dict(adapters="none", placeholder=0, k=3)
  same = jaxspec.generate(b, prompts, max_new_tokens=20, method="lud", method_options=dict(opts, beta=1.01))
  assert same.token_ids == ar.token_ids and same.stats.tokens_per_forward == pytest.approx(20 / 20)
  lossy = jaxspec.generate(b, prompts, max_new_tokens=20, method="lud", method_options=dict(opts, beta=0.5))
  assert lossy.stats.tokens_per_forward > 1.3  # whole units per forward
  assert all(len(t) == 20 for t in lossy.token_ids)
  exact = jaxspec.generate(b, prompts, max_new_tokens=20, method="lud", method_options=dict(opts, beta=0.3, verify=True))
  assert exact.token_ids == ar.token_ids  # lossless with respect to the fine-tuned model
  assert exact.stats.tokens_per_forward > 1.2  # drafts were accepted
  for i, p in enumerate(prompts):  # batch 1
    one = jaxspec.generate(b, [p], max_new_tokens=20, method="lud", method_options=dict(opts, beta=0.3, verify=True))
    assert one.token_ids[0] == ar.token_ids[i]


def test_lossy_batch_rows_decode_as_alone(trained):
  """Rows of a batch carry different pending counts (and finish at different steps): each row's
  lossy output equals its batch-1 output; an EOS inside a committed span ends the row there."""
  b, rows, _, _ = trained
  prompts = [r["prompt_ids"] for r in rows[3:7]]
  opts = dict(adapters="none", placeholder=0, k=3, beta=0.5)
  batch = jaxspec.generate(b, prompts, max_new_tokens=20, method="lud", method_options=opts)
  assert batch.stats.tokens_per_forward > 1.3
  for i, p in enumerate(prompts):
    assert jaxspec.generate(b, [p], max_new_tokens=20, method="lud", method_options=opts).token_ids[0] == batch.token_ids[i]
  # a token the spans commit, made an EOS: rows stop at it (nothing after it), even mid-span
  eos = collections.Counter(t for out in batch.token_ids for t in out[1:]).most_common(1)[0][0]
  with_eos = dataclasses.replace(b, config=dataclasses.replace(b.config, eos_token_ids=(eos,)), method_memory={})
  stopped = jaxspec.generate(with_eos, prompts, max_new_tokens=20,
                             method="lud", method_options=opts)
  assert any(len(cut) < 20 for cut in stopped.token_ids)
  for full, cut in zip(batch.token_ids, stopped.token_ids):
    assert cut == (full[:full.index(eos)] if eos in full else full)


def test_repetition_control_cuts_repeated_ngrams():
  from jaxspec.methods.lud import repeat_cut
  tokens = jnp.asarray([[5, 6, 7, 8, 0, 0, 0, 0, 0, 0]])
  num = jnp.asarray([4])
  span = jnp.asarray([[5, 6, 7]])  # "8 5" is new, "5 6" repeats: keep the first span token only
  assert int(repeat_cut(tokens, num, span, jnp.asarray([3]), 2)[0]) == 1
  assert int(repeat_cut(tokens, num, jnp.asarray([[9, 9, 9]]), jnp.asarray([3]), 2)[0]) == 2  # "9 9" repeats in the span
  assert int(repeat_cut(tokens, num, jnp.asarray([[1, 2, 3]]), jnp.asarray([3]), 2)[0]) == 3


def test_adapters_files_are_checked(tmp_path):
  b = make_tiny_bundle()
  with pytest.raises(HeadsFileError, match="not a trained-parameters folder"):
    jaxspec.generate(b, [[3, 4, 5]], max_new_tokens=4, method="lud", method_options=dict(adapters=str(tmp_path)))
  with pytest.raises(HeadsFileError, match="no packaged LUD adapters"):
    jaxspec.generate(b, [[3, 4, 5]], max_new_tokens=4, method="lud")
  with pytest.raises(InvalidOptionError, match="lossless"):
    jaxspec.get_method("lud", verify=True, no_repeat=3)
  with pytest.raises(InvalidOptionError, match="beta"):
    jaxspec.get_method("lud", beta=0)


def test_adapters_for_another_model_are_refused(tiny_lud_folder):
  b = make_tiny_bundle(seed=5)  # same shapes, other weights
  with pytest.raises(HeadsFileError, match="trained for base model"):
    jaxspec.generate(b, [[3, 4, 5]], max_new_tokens=4, method="lud", method_options=dict(adapters=str(tiny_lud_folder)))


@pytest.fixture
def tiny_lud_folder(tmp_path):
  """Random LUD adapters (valid metadata) for make_tiny_bundle()."""
  from jaxspec.heads_file import model_fingerprint, save_params_file
  b = make_tiny_bundle()
  _, params = canonical(b)
  ad = {k: (v if k.endswith(".A") else 0.05 * jax.random.normal(jax.random.key(1), v.shape))
        for k, v in lora.init_lora(jax.random.key(0), params, 2).items()}
  meta = {"kind": "lud_adapters", "base_model": b.name, "base_fingerprint": model_fingerprint(b), "placeholder_id": 0,
          "k": 3, "lora_scale": 2.0, "embed_dim": b.config.embed_dim, "vocab_size": b.config.vocab_size}
  return save_params_file(tmp_path / "lud", {k: np.asarray(v) for k, v in ad.items()}, meta, dtype=np.float16)


def test_adapters_are_merged_at_load(tiny_lud_folder):
  """Decoding with adapters = decoding the merged model (lossy beta > 1 and verify: its AR)."""
  b = make_tiny_bundle()
  m = jaxspec.get_method("lud", adapters=str(tiny_lud_folder)).resolve(b)
  assert (m.k, m.placeholder, m.adapters) == (3, 0, str(tiny_lud_folder))
  merged = b.__class__(**{**b.__dict__, "params": m.target_params(b), "method_memory": {}})
  prompts = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
  ar = jaxspec.generate(merged, prompts, max_new_tokens=12).token_ids
  assert ar != jaxspec.generate(b, prompts, max_new_tokens=12).token_ids  # the adapters change the model
  for opts in (dict(beta=1.01), dict(beta=0.05, verify=True)):
    got = jaxspec.generate(b, prompts, max_new_tokens=12, method="lud", method_options=dict(opts, adapters=str(tiny_lud_folder)))
    assert got.token_ids == ar, opts


@pytest.fixture(scope="module")
def real_tuned(smollm2):
  """(lud method resolved with the packaged adapters, the merged model as a bundle)."""
  m = jaxspec.get_method("lud", verify=True).resolve(smollm2)
  return m, smollm2.__class__(**{**smollm2.__dict__, "params": m.target_params(smollm2), "method_memory": {}})


@pytest.mark.slow  # the real model and the packaged adapters
def test_packaged_adapters_real_model(smollm2, real_tuned):
  from conftest import dev_prompts
  _, tuned = real_tuned
  prompts = dev_prompts(3)
  ar = jaxspec.generate(tuned, prompts, max_new_tokens=24, cache_len=512)
  exact = jaxspec.generate(smollm2, prompts, max_new_tokens=24, cache_len=512, method="lud", method_options=dict(verify=True))
  assert exact.token_ids == ar.token_ids and exact.stats.tokens_per_forward > 1.1
  for i, p in enumerate(prompts[:2]):  # batch 1
    one = jaxspec.generate(smollm2, [p], max_new_tokens=24, cache_len=512, method="lud", method_options=dict(verify=True))
    assert one.token_ids[0] == ar.token_ids[i]
  lossy = jaxspec.generate(smollm2, prompts, max_new_tokens=24, cache_len=512, method="lud")
  assert lossy.stats.tokens_per_forward > 1.1 and all(len(t) == 24 for t in lossy.token_ids)


@pytest.mark.slow  # exports the real model (540 MB) and compares with transformers' goldens
def test_exported_model_matches_transformers(smollm2, real_tuned, tmp_path):
  """`jaxspec lud export` writes a Hugging Face folder: transformers (torch, fp32; goldens made by
  experiments/make_goldens.py on the exported folder) and jaxspec read it with the same logits
  and greedy output, and `lud` decodes it as it is (its jaxspec_lud.json gives the placeholder)."""
  import json
  import os
  from jaxspec.heads_file import read_meta
  from jaxspec.train.lud import export_folder
  m, tuned = real_tuned
  folder = export_folder(smollm2, m.target_params(smollm2), read_meta(m.adapters), tmp_path / "tuned")
  back = jaxspec.load_model(str(folder), dtype=smollm2.dtype, progress=False)
  for adapters in (None, "none"):  # the folder's jaxspec_lud.json gives the placeholder and k
    got = jaxspec.get_method("lud", adapters=adapters).resolve(back)
    assert (got.adapters, got.placeholder, got.k) == ("none", m.placeholder, m.k)
  goldens = json.load(open(os.path.join(os.path.dirname(__file__), "goldens", "smollm2-135m-instruct-lud.json")))
  worst = 0.0
  for case in goldens["prompts"]:
    ids = jnp.asarray([case["prompt_ids"]])
    lg = np.asarray(back.model()(None, ids, jnp.arange(ids.shape[1])[None], None)[0][0, -1])
    top = np.asarray(case["top50_ids"])
    assert int(np.argmax(lg)) == int(top[0]), case.get("name")
    worst = max(worst, float(np.max(np.abs(lg[top] - np.asarray(case["top50_logits"])))))
  assert worst < 2e-3, worst
  cases = goldens["prompts"]
  out = jaxspec.generate(back, [c["prompt_ids"] for c in cases], max_new_tokens=32)
  eos = set(back.eos_ids)
  assert out.token_ids == [[t for t in c["greedy_ids"] if t not in eos] for c in cases]
  # the tuned model's own AR equals the exported folder's
  assert jaxspec.generate(tuned, [c["prompt_ids"] for c in cases], max_new_tokens=32).token_ids == out.token_ids
  again = jaxspec.generate(back, [c["prompt_ids"] for c in cases[:2]], max_new_tokens=16, method="lud",
                           method_options=dict(verify=True))
  assert again.token_ids == [t[:16] for t in out.token_ids[:2]]


def test_lora_fine_tune_resumes_exactly(tmp_path):
  """LoRA mode; an interrupted run resumed from its checkpoint equals the uninterrupted one."""
  from decoding_checks import _lud_rows
  from jaxspec.train import TrainConfig
  from jaxspec.train.lud import LudConfig, train_lud
  b = peaked_tiny_bundle(vocab=16, scale=30.0)
  rows = _lud_rows(b, n=16, new=12)
  cfg = LudConfig(k=3, alpha=0.6, mode="lora", rank=2, window=24, budget=12, placeholder_id=0)
  tcfg = TrainConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=6, save_every=4, log_every=2)
  full, full_log, meta = train_lud(b, rows, cfg, tcfg, tmp_path / "a", progress=False)
  train_lud(b, rows, cfg, tcfg, tmp_path / "b", progress=False, stop_after=6)
  resumed, resumed_log, _ = train_lud(b, rows, cfg, tcfg, tmp_path / "b", progress=False)
  assert sorted(full) == sorted(resumed) and "rows.0" in full and any(k.endswith(".B") for k in full)
  for k in full:
    np.testing.assert_array_equal(np.asarray(full[k]), np.asarray(resumed[k]))
  strip = lambda log: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in log]
  assert strip(resumed_log) == strip(full_log)
  assert meta["mode"] == "lora" and meta["rank"] == 2
