"""Hidden-transfer heads on a tiny random model (seconds): training lowers the loss, the heads
file is checked on load, and decoding with trained or random heads equals AR (greedy)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import make_tiny_bundle, random_heads_folder
from jaxspec.errors import HeadsFileError, InvalidOptionError
from jaxspec.heads_file import save_params_file
from jaxspec.methods.hidden_transfer import HiddenTransfer, pseudo_states
from jaxspec.train import TrainConfig
from jaxspec.train.hidden_transfer import build_store, train_heads

LAYER, K = 1, 3
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4, 3, 4, 3], [10, 11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def tiny():
  return make_tiny_bundle(seed=5, layers=3)


@pytest.fixture(scope="module")
def store(tiny):
  out = jaxspec.generate(tiny, PROMPTS * 4, "ar", max_new_tokens=24, temperature=1.0, seed=1)
  seqs = [p + o for p, o in zip(PROMPTS * 4, out.token_ids)]
  return build_store(tiny, seqs, LAYER, window=48, top_k=8, batch_size=4, progress=False)


def _save_random_heads(folder, bundle, **overrides):
  return random_heads_folder(bundle, folder, k=K, layer=LAYER, **overrides)


def test_store_holds_what_training_needs(tiny, store):
  N, S = store.tokens.shape
  c = tiny.config
  assert store.h.shape == (N, S, c.embed_dim) and store.k.shape == (N, c.num_layers - LAYER, c.num_kv_heads, S, c.head_dim)
  assert store.top_ids.shape == (N, S, 8) and np.all(np.diff(store.top_logp, axis=-1) <= 1e-6)
  a = store.anchors(K)
  assert np.all(a.arrays["pos"] + K < store.lengths[a.arrays["seq"]])  # every target exists


def test_training_lowers_the_kl_and_measures_acceptance(tiny, store, tmp_path):
  cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=20, save_every=20, log_every=5)
  heads, log, meta = train_heads(tiny, store, K, cfg, tmp_path / "run", progress=False)
  evals = [r["eval_loss"] for r in log if "eval_loss" in r]
  assert evals[-1] < evals[0]
  acc = np.asarray(meta["eval"]["accept_by_offset_slot"])
  assert acc.shape == (K, 5) and np.all(acc.sum(axis=1) <= 1.0 + 1e-6)
  folder = save_params_file(tmp_path / "heads", {n: np.asarray(v) for n, v in heads.items()}, meta)
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=20)
  got = jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(folder), nodes=6, cost=(1.0, 1.0, 1.0)),
                         max_new_tokens=20)
  assert got.token_ids == want.token_ids


def test_heads_with_token_input_learn_from_the_pending_token(tiny, store, tmp_path):
  cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=20, save_every=20, log_every=5)
  heads, log, meta = train_heads(tiny, store, K, cfg, tmp_path / "run", progress=False, token_input=True)
  evals = [r["eval_loss"] for r in log if "eval_loss" in r]
  assert evals[-1] < evals[0] and meta["token_input"]
  assert float(jnp.abs(heads["U_KxExE"]).max()) > 0  # trained away from its zero init
  # the pending token moves the pseudo states; heads without U ignore it
  h = jax.random.normal(jax.random.key(0), (2, tiny.config.embed_dim))
  e = jax.random.normal(jax.random.key(1), (2, tiny.config.embed_dim))
  assert not np.allclose(pseudo_states(heads, h, e), pseudo_states(heads, h, 2 * e))
  plain = {n: v for n, v in heads.items() if n != "U_KxExE"}
  np.testing.assert_array_equal(pseudo_states(plain, h, e), pseudo_states(plain, h))


@pytest.mark.parametrize("opts", [dict(nodes=6, adaptive=False), dict(nodes=8, cost=(1.0, 1.0, 1.0)), dict(nodes=2),
                                  dict(nodes="auto"), dict(nodes=6, adaptive=False, token_input=True),
                                  dict(nodes=6, lookup=5, min_ngram=1, cost=(1.0, 1.0, 1.0)),
                                  dict(nodes=8, lookup=5, min_ngram=1, recycle=4, cost=(1.0, 1.0, 1.0)),
                                  dict(nodes=6, adaptive=False, recycle=0)])
def test_random_heads_decode_exactly_like_ar(tiny, tmp_path, opts):
  opts = dict(opts)
  folder = _save_random_heads(tmp_path / "h", tiny, token_input=opts.pop("token_input", False))
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=20)
  got = jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(folder), **opts), max_new_tokens=20)
  assert got.token_ids == want.token_ids
  assert got.stats.steps <= want.stats.steps


def test_nodes_auto_prices_the_partial_pass(tiny, tmp_path, monkeypatch):
  """`nodes="auto"` picks the template with the best (1 + expected accepted) / (forward + pass):
  a dear pass favours bigger trees (more tokens per paid pass), a free one the curve's optimum."""
  import jaxspec.profiling
  folder = _save_random_heads(tmp_path / "h", tiny)
  m = HiddenTransfer(heads=str(folder), lookup=0).resolve(tiny)
  monkeypatch.setattr(jaxspec.profiling, "forward_time_curve", lambda bundle, sizes: {t: 1.0 + 0.2 * (t - 1) for t in sizes})

  def best(pass_cost):
    rate = {n: (1 + m._expected(m._template(n))) / (1.0 + 0.2 * n + pass_cost) for n in (2, 4, 8, 12, 16, 24)}
    return max(rate, key=rate.get)

  assert best(0.0) != best(5.0)
  assert m._pick_nodes(tiny, 0.0) == best(0.0) and m._pick_nodes(tiny, 5.0) == best(5.0)


def test_a_grafted_lookup_chain_drafts_where_the_text_repeats(tiny, tmp_path):
  """Random heads rarely draft right; the lookup chain on the main path does in repetitive rows,
  and a step whose only drafts are grafted ones skips the heads' partial pass (same output)."""
  folder = _save_random_heads(tmp_path / "h", tiny)
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  plain = jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(folder), nodes=4, adaptive=False, lookup=0),
                           max_new_tokens=24)
  m = HiddenTransfer(heads=str(folder), nodes=4, lookup=6, min_ngram=1, adaptive=False)
  got = jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24)
  assert got.token_ids == want.token_ids
  assert got.stats.tokens_per_forward > plain.stats.tokens_per_forward
  only_chain = HiddenTransfer(heads=str(folder), nodes=4, lookup=6, min_ngram=1, cost=(1.0, 1.0, 99.0))
  assert only_chain.resolve(tiny).forward_sizes[1] <= 1 + 6  # the middle prefix is the main path alone
  assert jaxspec.generate(tiny, PROMPTS, only_chain, max_new_tokens=24).token_ids == want.token_ids
  with pytest.raises(InvalidOptionError, match="min_ngram"):
    HiddenTransfer(lookup=2, min_ngram=0)


def test_recycled_depths_read_their_parent_token_and_persist(tiny, tmp_path):
  """With `recycle`, every node below depth 1 drafts candidate `slot` of the matrix row of its
  parent's token (heads draft depth 1 only), rows never written draft nothing, the output is
  AR's, and the matrix carries over to the next call on the bundle."""
  from flax import nnx
  from jaxspec import engine
  from jaxspec.sampling import SamplingConfig
  folder = _save_random_heads(tmp_path / "h", tiny)
  m = HiddenTransfer(heads=str(folder), nodes=8, recycle=4, lookup=0, adaptive=False).resolve(tiny)
  tree, slots = m._tree_and_slots
  deep = np.nonzero(tree.depth >= 2)[0]
  assert len(deep) and tree.max_depth >= 3
  V = tiny.config.vocab_size
  st = engine.init_state(tiny.config, [PROMPTS[0]], 8, m, None, 64, 8, jnp.float32)
  M_Vxk = jax.random.randint(jax.random.key(3), (V, 4), 0, V)
  seen_V = jnp.arange(V) % 5 != 0  # some rows unwritten
  st = st.replace(method_state=st.method_state.replace(M_Vxk=M_Vxk, seen_V=seen_V, has_h_B=jnp.ones((1,), bool)))
  model = nnx.merge(tiny.graphdef, tiny.params)
  draft, _ = m.propose(model, m.load_params(tiny), st, SamplingConfig(0.0), jax.random.key(0))
  tok, valid = np.asarray(draft.tokens[0]), np.asarray(draft.valid[0])
  M, seen = np.asarray(M_Vxk), np.asarray(seen_V)
  for i in deep:
    parent = tree.parents[i]
    assert tok[i] == M[tok[parent], slots[i]]
    assert valid[i] == (valid[parent] and seen[tok[parent]])
  assert valid[tree.depth == 1].all()

  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  tiny.method_memory.pop(m.memory_key, None)
  assert jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24).token_ids == want.token_ids
  _, seen_after, _ = tiny.method_memory[m.memory_key]
  assert np.asarray(seen_after).sum() > 0
  assert jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24).token_ids == want.token_ids  # from the kept matrix
  with pytest.raises(InvalidOptionError, match="recycle"):
    HiddenTransfer(recycle=99)


def test_depth_one_merges_the_heads_and_the_pending_tokens_row(tiny, tmp_path):
  """With `root_recycle=j`, depth-1 slot c holds the c-th distinct token of: the heads' top-1, the
  pending token's matrix row's top-1, the heads' next ranks, the row's next ones (a row never
  written adds nothing); the output is AR's."""
  from flax import nnx
  from jaxspec import engine
  from jaxspec.methods.hidden_transfer import pseudo_logits
  from jaxspec.sampling import SamplingConfig
  folder = _save_random_heads(tmp_path / "h", tiny)
  m = HiddenTransfer(heads=str(folder), nodes=8, recycle=4, root_recycle=2, lookup=0, adaptive=False).resolve(tiny)
  tree, slots = m._tree_and_slots
  first = np.nonzero(tree.depth == 1)[0]
  assert len(first) >= 3
  V = tiny.config.vocab_size
  model = nnx.merge(tiny.graphdef, tiny.params)
  heads = m.load_params(tiny)
  for written in (True, False):
    st = engine.init_state(tiny.config, [PROMPTS[0]], 8, m, None, 64, 8, jnp.float32)
    ms = st.method_state
    root = PROMPTS[0][-1]
    top = np.asarray(jax.lax.top_k(pseudo_logits(model, heads, st.cache, ms.h_BxE, m.layer, pending_B=jnp.asarray([root]),
                                                 offsets=1)[0, 0], 8)[1])
    row = np.asarray([top[1], 7, 9, 9])  # the row's top-1 repeats the heads' 2nd: dropped there, kept once
    M_Vxk = jnp.zeros((V, 4), jnp.int32).at[root].set(jnp.asarray(row))
    seen_V = jnp.zeros((V,), bool).at[root].set(written)
    st = st.replace(method_state=ms.replace(M_Vxk=M_Vxk, seen_V=seen_V, has_h_B=jnp.ones((1,), bool)))
    draft, _ = m.propose(model, heads, st, SamplingConfig(0.0), jax.random.key(0))
    tok = np.asarray(draft.tokens[0])
    order = [top[0]] + ([row[0]] if written else []) + list(top[1:5]) + ([row[1]] if written else [])
    want = list(dict.fromkeys(int(t) for t in order))
    assert [int(tok[i]) for i in first] == [want[slots[i]] for i in first]
    assert np.asarray(draft.valid[0])[first].all()
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  assert jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24).token_ids == want.token_ids
  with pytest.raises(InvalidOptionError, match="root_recycle"):
    HiddenTransfer(recycle=2, root_recycle=3)


def test_a_dynamic_tree_verifies_each_rows_most_probable_pool_nodes(tiny, tmp_path):
  """With `dynamic`, each row verifies the `nodes` pool nodes of highest probability (its parent's
  times its own confidence; a repeated sibling token dropped), most probable first, parents before
  children; the output is AR's, batch and ragged, sized or not."""
  from flax import nnx
  from jaxspec import engine
  from jaxspec.methods.hidden_transfer import ROW_CONFIDENCE
  from jaxspec.sampling import SamplingConfig
  folder = _save_random_heads(tmp_path / "h", tiny)
  m = HiddenTransfer(heads=str(folder), nodes=6, pool=16, recycle=4, lookup=0, adaptive=False,
                     dynamic=True).resolve(tiny)
  assert m.tree.size == 7 and m.scratch_tokens == 7
  V = tiny.config.vocab_size
  st = engine.init_state(tiny.config, PROMPTS[:2], 8, m, None, 64, 8, jnp.float32)
  M_Vxk = jax.random.randint(jax.random.key(3), (V, 4), 0, V)
  P_Vxk = jnp.sort(jax.random.dirichlet(jax.random.key(4), jnp.ones(6), (V,))[:, :4], axis=1)[:, ::-1]
  seen_V = jnp.arange(V) % 5 != 0
  h_BxE = jax.random.normal(jax.random.key(2), (2, tiny.config.embed_dim))
  st = st.replace(method_state=st.method_state.replace(M_Vxk=M_Vxk, seen_V=seen_V, P_Vxk=P_Vxk, h_BxE=h_BxE,
                                                       has_h_B=jnp.ones((2,), bool)))
  model = nnx.merge(tiny.graphdef, tiny.params)
  params = m.load_params(tiny)
  draft, _ = m.propose(model, params, st, SamplingConfig(0.0), jax.random.key(0))
  # the pool as drafted, scored here independently: reach = own x parent's reach
  tokens, valid, _, own = (np.asarray(x) for x in m._fill(model, params, st, "auto", lambda v, c, g: v, None))
  pool = m._tree_and_slots[0]
  M, P = np.asarray(M_Vxk), np.asarray(P_Vxk)
  for b in range(2):
    reach, kept = {0: 1.0}, {}
    for i in range(1, pool.size):
      p, key = pool.parents[i], (pool.parents[i], int(tokens[b, i]))
      if valid[b, i] and p in reach and key not in kept:
        kept[key] = i
        reach[i] = reach[p] * own[b, i]
        if pool.depth[i] >= 2:  # a recycled candidate: its stored probability, scaled
          c = list(M[tokens[b, p]]).index(tokens[b, i])
          np.testing.assert_allclose(own[b, i], P[tokens[b, p], c] * ROW_CONFIDENCE, rtol=1e-5)
    best = sorted(reach.values(), reverse=True)[:7]
    sel_tok, sel_valid = np.asarray(draft.tokens[b]), np.asarray(draft.valid[b])
    sel_par, sel_acc = np.asarray(draft.parents[b]), np.asarray(draft.accept[b])
    got_reach = [1.0]
    for i in range(1, 7):
      assert sel_valid[i] and 0 <= sel_par[i] < i
      got_reach.append(got_reach[sel_par[i]] * sel_acc[i])
    np.testing.assert_allclose(got_reach, best, rtol=1e-5)  # the most probable nodes, in order
    assert len({(int(sel_par[i]), int(sel_tok[i])) for i in range(1, 7)}) == 6  # no repeated sibling

  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  for opts in (dict(adaptive=False), dict(cost=(1.0, 1.0, 1.0)), dict(lookup=4, min_ngram=1, cost=(1.0, 1.0, 1.0))):
    dyn = HiddenTransfer(heads=str(folder), nodes=6, pool=16, recycle=4, dynamic=True, **opts)
    got = jaxspec.generate(tiny, PROMPTS, dyn, max_new_tokens=24)
    assert got.token_ids == want.token_ids
    assert got.stats.steps < want.stats.steps
  for bad in (dict(recycle=0), dict(nodes=20, pool=16), dict(nodes="auto")):
    with pytest.raises(InvalidOptionError, match="dynamic"):
      HiddenTransfer(dynamic=True, **bad)


def test_a_draft_vocabulary_limits_the_heads_drafts(tiny, tmp_path):
  """Heads saved with a draft vocabulary rank depth-1 drafts over those tokens only (the partial
  pass reads only their LM-head columns); the output is still AR's. The vocabulary is the data's
  tokens by frequency, then the lowest ids."""
  from flax import nnx
  from jaxspec import engine
  from jaxspec.sampling import SamplingConfig
  from jaxspec.train.hidden_transfer import draft_vocabulary
  vocab = draft_vocabulary([[9, 9, 9, 4, 4, 60]], tiny.config.vocab_size, 12)
  assert vocab.tolist() == [9, 4, 60, 0, 1, 2, 3, 5, 6, 7, 8, 10]
  with pytest.raises(ValueError, match="draft vocabulary size"):
    draft_vocabulary([[1]], tiny.config.vocab_size, 4)
  folder = random_heads_folder(tiny, tmp_path / "hv", k=K, layer=LAYER, vocab_N=vocab)
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=20)
  for opts in (dict(nodes=6, adaptive=False), dict(nodes=6, adaptive=False, recycle=4), dict(nodes=6, draft_vocab=False)):
    assert jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(folder), **opts), max_new_tokens=20).token_ids \
        == want.token_ids
  m = HiddenTransfer(heads=str(folder), nodes=8, adaptive=False, lookup=0, recycle=0).resolve(tiny)  # heads draft all
  st = engine.init_state(tiny.config, [PROMPTS[0]], 8, m, None, 64, 8, jnp.float32)
  h_1xE = jax.random.normal(jax.random.key(2), (1, tiny.config.embed_dim))  # an anchor state
  st = st.replace(method_state=st.method_state.replace(has_h_B=jnp.ones((1,), bool), h_BxE=h_1xE))
  model = nnx.merge(tiny.graphdef, tiny.params)
  for uses, opts in ((True, {}), (False, dict(draft_vocab=False))):
    mm = dataclasses.replace(m, **opts)
    draft, _ = mm.propose(model, mm.load_params(tiny), st, SamplingConfig(0.0), jax.random.key(0))
    drafted = set(np.asarray(draft.tokens[0])[1:].tolist())
    assert (drafted <= set(vocab.tolist())) == uses
  bad = random_heads_folder(tiny, tmp_path / "bad", k=K, layer=LAYER, vocab_N=np.array([1, 2, 3, 4, 5, 6, 7, 999]))
  with pytest.raises(HeadsFileError, match="vocab_N"):
    jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(bad)), max_new_tokens=4)


def test_bad_heads_files_are_clear_errors(tiny, tmp_path):
  with pytest.raises(HeadsFileError, match="not a trained-parameters folder"):
    jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(tmp_path / "none")), max_new_tokens=4)
  other = _save_random_heads(tmp_path / "other", tiny, base_fingerprint="0123456789abcdef")
  with pytest.raises(HeadsFileError, match="trained for base model"):
    jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(other)), max_new_tokens=4)
  vocab = _save_random_heads(tmp_path / "vocab", tiny, vocab_size=999)
  with pytest.raises(HeadsFileError, match="vocab 999"):
    jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(vocab)), max_new_tokens=4)
  bad = _save_random_heads(tmp_path / "bad", tiny)
  data = bytearray((bad / "params.safetensors").read_bytes())
  data[-5] ^= 0xFF
  (bad / "params.safetensors").write_bytes(bytes(data))
  with pytest.raises(HeadsFileError, match="does not match the sha256"):
    jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(bad)), max_new_tokens=4)
  with pytest.raises(HeadsFileError, match="no packaged hidden-transfer heads"):
    jaxspec.generate(tiny, PROMPTS, HiddenTransfer(), max_new_tokens=4)
  from safetensors.numpy import load_file
  good = _save_random_heads(tmp_path / "good", tiny)
  params = dict(load_file(str(good / "params.safetensors")), U_KxExE=np.zeros((K, 32, 8), np.float32))
  odd = save_params_file(tmp_path / "odd", params, json.loads((good / "meta.json").read_text()))
  with pytest.raises(HeadsFileError, match="unexpected head arrays"):
    jaxspec.generate(tiny, PROMPTS, HiddenTransfer(heads=str(odd)), max_new_tokens=4)
