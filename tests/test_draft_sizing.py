"""Pay per draft: each step runs the smallest forward that holds its draft (lax.switch over the
method's forward sizes), pld picks its draft length by expected tokens/s; outputs stay AR's."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import make_tiny_bundle
from jaxspec.methods import draft_sizing
from jaxspec.methods.prompt_lookup import PromptLookup
from jaxspec.methods.draft_sizing import draft_need
from jaxspec.api import reset_method_memory
from jaxspec.errors import InvalidOptionError

# repetitive prompts (prompt lookup finds matches) and a ragged batch
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [3, 4, 3, 4, 3], [10, 11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def tiny():
  return make_tiny_bundle(seed=3)


def test_draft_need_is_the_last_valid_node_of_any_row():
  valid = jnp.asarray([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], bool)
  assert int(draft_need(valid)) == 3
  assert int(draft_need(valid[:1])) == 1


def test_prefix_sizes_and_expected_table():
  assert draft_sizing.prefix_sizes(9) == (1, 5, 9) and draft_sizing.prefix_sizes(2) == (1, 2)
  # a root with two children (0.5, 0.2), the first with a child (0.5): E by prefix at g = 1
  table = draft_sizing.expected_table((-1, 0, 0, 1), [0.0, 0.5, 0.2, 0.5])
  g1 = int(np.argmin(np.abs(draft_sizing.SCALES - 1.0)))
  np.testing.assert_allclose(table[:, g1], [0, 0, 0.5, 0.7, 0.95], rtol=1e-6)
  assert np.all(np.diff(table[-1]) >= 0)  # a larger scale never predicts fewer accepted tokens


def test_row_tables_are_each_rows_expected_table():
  """Trees chosen per step (one per row, with per-node confidence) get the table their static tree
  would: the sizing then reads each row's own."""
  trees = [((-1, 0, 0, 1), [0.0, 0.5, 0.2, 0.5]), ((-1, 0, 1, 2), [0.0, 0.9, 0.8, 0.1])]
  got = draft_sizing.row_tables(jnp.asarray([p for p, _ in trees], jnp.int32),
                                jnp.asarray([a for _, a in trees], jnp.float32), max_depth=3)
  for b, (parents, accept) in enumerate(trees):
    np.testing.assert_allclose(got.E_BxTxG[b], draft_sizing.expected_table(parents, accept), rtol=1e-5, atol=1e-6)
  stats = draft_sizing.init_stats(1, 2)
  # tokens per forward time by size 1..4: row 0 1, 1.5/1.2, 1.7/1.4, 1.95/1.9; row 1 (the confident
  # chain) 1, 1.9/1.2, 2.62/1.4, 2.69/1.9
  sizes = draft_sizing.best_sizes(stats, got, (1, 2, 3, 4), (1.0, 1.2, 1.4, 1.9), jnp.zeros((2,), jnp.int32))
  assert sizes.tolist() == [2, 3]


def best(stats, table, sizes, cost):
  return int(draft_sizing.best_sizes(stats, table, sizes, cost, jnp.zeros((1,), jnp.int32))[0])


def test_best_size_follows_cost_and_learned_acceptance():
  table = draft_sizing.expected_table(tuple(range(-1, 4)), [0.0] + [0.5] * 4)  # chain of 4 drafts
  sizes, stats = (1, 3, 5), draft_sizing.init_stats(max_loss=None)  # the learned scale alone
  assert best(stats, table, sizes, (1.0, 1.0, 1.0)) == 5  # free tokens: draft all
  assert best(stats, table, sizes, (1.0, 3.0, 5.0)) == 1  # cost per token: no draft
  good = bad = stats
  one = jnp.asarray([True])
  for _ in range(30):  # every draft accepted / none accepted
    good = draft_sizing.observe(good, table, jnp.asarray([5]), jnp.asarray([4]), one)
    bad = draft_sizing.observe(bad, table, jnp.asarray([5]), jnp.asarray([0]), one)
  cost = (1.0, 1.8, 2.4)
  assert best(stats, table, sizes, cost) == 1  # the prior alone does not pay here
  assert best(good, table, sizes, cost) == 5
  assert best(bad, table, sizes, (1.0, 1.2, 1.4)) == 1
  # forgetting: steps that verify nothing carry no information; the prior comes back
  for _ in range(300):
    bad = draft_sizing.observe(bad, table, jnp.asarray([1]), jnp.asarray([0]), one)
  assert best(bad, table, sizes, (1.0, 1.2, 1.4)) > 1


def _simulate(stats, accept, steps=120, sizes=(1, 3, 5), cost=(1.0, 1.24, 1.5)):
  """One row drafting a chain of 4 (prior 0.5 each) for `steps` steps, each draft accepted while
  accept(step) says so; returns (forward time spent, tokens) after each step, prefill counted as
  one forward for one token, and the sizes run."""
  table = draft_sizing.expected_table(tuple(range(-1, 4)), [0.0] + [0.5] * 4)
  one, time, tokens, trace, ran = jnp.asarray([True]), 1.0, 1, [], []
  for step in range(steps):
    size = best(stats, table, sizes, cost)
    valid = jnp.arange(5)[None, :] < size
    accepted = size - 1 if accept(step) else 0
    committed = jnp.asarray([accepted + 1])
    stats = draft_sizing.observe(stats, table, jnp.asarray([size]), jnp.asarray([accepted]), one)
    stats = draft_sizing.spend(stats, sizes, cost, valid, None, committed, one)
    time, tokens = time + cost[sizes.index(size)], tokens + accepted + 1
    trace.append((time, tokens))
    ran.append(size)
  return trace, ran


def test_the_loss_bound_keeps_a_generation_whose_drafts_fail_within_max_loss_of_ar():
  """Every draft rejected: unbounded, the prior's pull keeps drafting and the generation falls
  behind AR by far more than 5%; bounded, it never does, yet it still tries a draft now and then."""
  never = lambda step: False
  free, free_sizes = _simulate(draft_sizing.init_stats(max_loss=None), never)
  assert max(t / n for t, n in free) > 1.1 and sum(s > 1 for s in free_sizes) > 10
  for loss in (0.05, 0.2):
    bounded, sizes = _simulate(draft_sizing.init_stats(max_loss=loss), never)
    assert all(t <= (1 + loss) * n + 1e-4 for t, n in bounded), loss
    assert any(s > 1 for s in sizes), loss  # exploration is rationed, not stopped
  _, none_at_all = _simulate(draft_sizing.init_stats(max_loss=0.0), never)
  assert set(none_at_all) == {1}  # no loss allowed and nothing gained: never a draft


def test_accepted_drafts_earn_room_to_draft_more():
  """Drafts that are accepted put the generation ahead of AR: the bound stops binding, and a
  bad spell afterwards is paid from what was gained."""
  bound = lambda: draft_sizing.init_stats(max_loss=0.05)
  _, sizes = _simulate(bound(), lambda step: True, steps=40)
  assert sizes[:2] == [1, 1] and all(s == 5 for s in sizes[10:])  # the bound holds only at the start
  trace, sizes = _simulate(bound(), lambda step: step < 30, steps=90)
  assert all(t <= 1.05 * n + 1e-4 for t, n in trace)
  assert sum(s > 1 for s in sizes[30:]) > sum(s > 1 for s in _simulate(bound(), lambda s: False, steps=60)[1])


def test_the_loss_bound_is_per_row_and_checked():
  table = draft_sizing.expected_table(tuple(range(-1, 4)), [0.0] + [0.9] * 4)
  stats = draft_sizing.init_stats(batch_size=2, max_loss=0.05).replace(ahead_B=jnp.asarray([0.05, 3.0]))
  sizes = draft_sizing.best_sizes(stats, table, (1, 3, 5), (1.0, 1.24, 1.5), jnp.zeros((2,), jnp.int32))
  assert sizes.tolist() == [1, 5]
  with pytest.raises(InvalidOptionError, match="max_loss"):
    draft_sizing.init_stats(max_loss=-0.1)


@pytest.mark.parametrize("cost,expect", [((1.0, 1.0, 1.0), "drafts"), ((1.0, 50.0, 90.0), "never")])
def test_per_step_sizes_keep_greedy_output_and_pay_only_for_the_draft(tiny, cost, expect):
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  full = jaxspec.generate(tiny, PROMPTS, PromptLookup(k=4, adaptive=False), max_new_tokens=24)
  got = jaxspec.generate(tiny, PROMPTS, PromptLookup(k=4, sizes=(1, 3, 5), cost=cost), max_new_tokens=24)
  assert got.token_ids == full.token_ids == want.token_ids
  assert full.stats.forward_tokens == 5 * full.stats.steps  # fixed size: every step pays k + 1
  if expect == "never":  # drafting never pays: every step is a 1-token forward, exactly AR's steps
    assert got.stats.forward_tokens == got.stats.steps == want.stats.steps
  else:  # drafts where matches exist, 1-token forwards where no row has one
    assert got.stats.tokens_per_forward > 1.0
    assert got.stats.steps < got.stats.forward_tokens < 5 * got.stats.steps


def test_resolved_cost_comes_from_the_measured_curve(tiny):
  m = PromptLookup(k=4).resolve(tiny)
  assert m.sizes == (1, 3, 5) and len(m.cost) == 3 and m.cost[0] == 1.0 and all(c > 0 for c in m.cost)
  assert PromptLookup(k=4, adaptive=False).forward_sizes == (5,)
  assert PromptLookup(k=5, sizes="1/6").sizes == (1, 6)
  with pytest.raises(InvalidOptionError, match="end at k"):
    PromptLookup(k=4, sizes=(1, 3))
  with pytest.raises(InvalidOptionError, match="1/3/6"):
    PromptLookup(k=4, sizes="1,x")


def test_recycling_verifies_the_template_prefix_that_pays(tiny):
  from jaxspec.methods.token_recycling import TokenRecycling
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  for cost, size in [((1.0, 1.0, 5.0), 5), ((1.0, 50.0, 90.0), 1), ((1.0, 1.0, 1.0), 9)]:
    m = TokenRecycling(template="small", cost=cost)
    assert m.forward_sizes == (1, 5, 9)
    reset_method_memory(tiny, "recycling")
    got = jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24)
    assert got.token_ids == want.token_ids, cost
    # at most the chosen prefix; less while the matrix is empty (drafts from unwritten rows are invalid)
    assert got.stats.forward_tokens <= size * got.stats.steps, cost
    if size == 1:
      assert got.stats.forward_tokens == got.stats.steps
    else:
      assert got.stats.forward_tokens > got.stats.steps and got.stats.tokens_per_forward > 1.0, cost


def test_contexts_learn_apart_and_rows_pick_their_own_size():
  table = draft_sizing.expected_table(tuple(range(-1, 4)), [0.0] + [0.5] * 4)
  stats = draft_sizing.init_stats(contexts=2, max_loss=None)
  rows = jnp.asarray([True, True])
  for _ in range(30):  # context 1 (say, a long n-gram match) is always accepted, context 0 never
    stats = draft_sizing.observe(stats, table, jnp.asarray([5, 5]), jnp.asarray([0, 4]), rows, jnp.asarray([0, 1]))
  sizes = draft_sizing.best_sizes(stats, table, (1, 3, 5), (1.0, 1.8, 2.4), jnp.asarray([0, 1, 1, 0]))
  assert sizes.tolist() == [1, 5, 5, 1]


def test_a_table_per_context_predicts_with_its_own_priors():
  chain = tuple(range(-1, 4))
  table = np.stack([draft_sizing.expected_table(chain, [0.0] + [0.3] * 4),  # context 0: drafts rarely hold
                    draft_sizing.expected_table(chain, [0.0] + [0.9] * 4)])  # context 1: they usually do
  stats, cost = draft_sizing.init_stats(contexts=2, max_loss=None), (1.0, 1.5, 1.8)
  sizes = draft_sizing.best_sizes(stats, table, (1, 3, 5), cost, jnp.asarray([0, 1]))
  assert sizes.tolist() == [1, 5]
  # observations are scored against the row's own context's table
  for _ in range(30):
    stats = draft_sizing.observe(stats, table, jnp.asarray([5, 5]), jnp.asarray([4, 0]), jnp.asarray([True, True]),
                                 jnp.asarray([0, 1]))
  sizes = draft_sizing.best_sizes(stats, table, (1, 3, 5), cost, jnp.asarray([0, 1]))
  assert sizes[0] > 1 and sizes[1] == 1


def test_a_cost_per_context_prices_drafting_work_apart():
  """Same acceptance, same forward sizes: the context whose drafting costs extra (a partial pass)
  drafts less."""
  table = draft_sizing.expected_table(tuple(range(-1, 4)), [0.0] + [0.5] * 4)
  stats = draft_sizing.init_stats(contexts=2, max_loss=None)
  cost = ((1.0, 1.4, 1.7), (1.0, 1.9, 2.2))  # context 1 pays 0.5 of a forward more to draft
  sizes = draft_sizing.best_sizes(stats, table, (1, 3, 5), cost, jnp.asarray([0, 1]))
  assert sizes.tolist() == [3, 1]
  assert draft_sizing.best_sizes(stats, table, (1, 3, 5), cost[0], jnp.asarray([0, 1])).tolist() == [3, 3]


def test_hidden_transfer_prices_its_partial_pass(tiny, tmp_path):
  """The measured pass is added to every size that verifies a head's draft: all sizes > 1
  without a lookup match, only those past the grafted chain with one."""
  from conftest import random_heads_folder
  from jaxspec.methods.hidden_transfer import HiddenTransfer
  folder = random_heads_folder(tiny, tmp_path / "h", k=3, layer=1)
  m = HiddenTransfer(heads=str(folder), nodes=6, lookup=3).resolve(tiny)
  assert 0.0 < m.pass_cost < 5.0
  sizes, cost = m.forward_sizes, m.cost
  for c, row in enumerate(m.step_cost):
    for s, forward, step in zip(sizes, cost, row):
      pays = s > 1 and (c == 0 or s > 1 + 3)
      assert step == pytest.approx(forward + (m.pass_cost if pays else 0.0))


@pytest.mark.parametrize("cost", [(1.0, 1.0, 1.0), (1.0, 50.0, 90.0)])
def test_recycling_with_a_grafted_lookup_chain_keeps_ar_output(tiny, cost):
  from jaxspec.methods.token_recycling import TokenRecycling
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  m = TokenRecycling(template="small", lookup=4, cost=cost)
  assert m.tree.size == 10 and m.forward_sizes == (1, 6, 10)  # small (9) + one node: the main path to depth 4
  reset_method_memory(tiny, "recycling")
  got = jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24)
  assert got.token_ids == want.token_ids
  if cost[1] > 1.0:  # drafting never pays: 1-token forwards only
    assert got.stats.forward_tokens == got.stats.steps == want.stats.steps
  else:  # the repetitive rows draft from lookup from the first step, before the matrix has anything
    reset_method_memory(tiny, "recycling")
    plain = jaxspec.generate(tiny, PROMPTS, TokenRecycling(template="small", cost=(1.0, 1.0, 1.0)), max_new_tokens=24)
    assert got.stats.tokens_per_forward > plain.stats.tokens_per_forward > 1.0


def test_recycling_lookup_options_are_checked():
  from jaxspec.methods.token_recycling import TokenRecycling
  with pytest.raises(InvalidOptionError, match="lookup"):
    TokenRecycling(template="small", lookup=-1)


def test_lookup_priors_grow_with_the_matched_ngram():
  from jaxspec.methods.prompt_lookup import PRIOR_ACCEPT_BY_NGRAM, prior_accept
  assert prior_accept(0, 3) == [0.0, 0.0, 0.0]  # no match: no draft
  assert prior_accept(9, 2) == list(PRIOR_ACCEPT_BY_NGRAM[3][:2])  # longer n-grams: the longest measured
  deep = prior_accept(1, 12)
  assert len(deep) == 12 and deep[8:] == [PRIOR_ACCEPT_BY_NGRAM[1][-1]] * 4
  assert prior_accept(1, 1) < prior_accept(2, 1) < prior_accept(3, 1)
  # pld: one table per matched n; at the same cost a 3-gram match drafts deeper than a 1-gram one
  m = PromptLookup(k=5, cost=(1.0, 1.5, 1.8))
  assert m._table.shape == (4, 7, len(draft_sizing.SCALES))
  stats = draft_sizing.init_stats(4, max_loss=None)
  sizes = draft_sizing.best_sizes(stats, m._table, m.sizes, m.cost, jnp.asarray([0, 1, 3]))
  assert sizes.tolist() == [1, 1, 6]


def test_recycling_grafts_lookup_only_from_min_ngram(tiny):
  """min_ngram=2: a row whose only match is one token drafts the recycled tree (context 0)."""
  from jaxspec.methods.token_recycling import TokenRecycling
  with pytest.raises(InvalidOptionError, match="min_ngram"):
    TokenRecycling(template="small", lookup=4, min_ngram=4)
  m = TokenRecycling(template="small", lookup=4, min_ngram=2, cost=(1.0, 1.0, 1.0))
  assert len(m.context_priors()) == 4 and m.context_priors()[3][1] > m.context_priors()[1][1]
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  reset_method_memory(tiny, "recycling")
  got = jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24)
  assert got.token_ids == want.token_ids


def test_max_loss_is_an_option_of_every_sized_method(tiny):
  from jaxspec.methods import get_method
  for name in ("pld", "recycling", "hidden_transfer", "auto"):
    with pytest.raises(InvalidOptionError, match="max_loss"):
      get_method(name, max_loss=-0.5)
  assert get_method("auto").max_loss == draft_sizing.MAX_LOSS  # auto's promise: never far behind AR
  assert get_method("pld").max_loss is None and get_method("recycling").max_loss is None  # speed first
  resolved = get_method("auto", max_loss=0.2).resolve(tiny)
  assert resolved.max_loss == 0.2
  state = resolved.init_method_state(tiny.config, 3, 256, tiny.dtype)
  assert state.sizing.ahead_B.shape == (3,) and float(state.sizing.max_loss) == pytest.approx(0.2)
  unbounded = get_method("pld", max_loss=None).init_method_state(tiny.config, 2, 256, tiny.dtype)
  assert np.isinf(np.asarray(unbounded.ahead_B)).all()


def test_recycling_memory_carries_the_matrix_but_not_the_loss_bound(tiny):
  """The matrix persists across calls (and batch sizes); the loss bound starts afresh each call."""
  from jaxspec.api import _prepare
  from jaxspec.methods.token_recycling import TokenRecycling
  m = TokenRecycling(template="small", cost=(1.0, 1.2, 1.4), max_loss=draft_sizing.MAX_LOSS)
  reset_method_memory(tiny, "recycling")
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  one = jaxspec.generate(tiny, PROMPTS[:1], m, max_new_tokens=24)
  assert one.token_ids == want.token_ids[:1]
  memory = tiny.method_memory[m.memory_key]
  assert float(memory.sizing.ahead_B[0]) != pytest.approx(draft_sizing.MAX_LOSS)  # the call moved it
  _, _, _, _, state = _prepare(tiny, PROMPTS, m, 24, 0.0, 0, 1.0, 0, None, None, None)
  np.testing.assert_array_equal(state.method_state.M_Vxk, memory.M_Vxk)
  np.testing.assert_allclose(state.method_state.sizing.ahead_B, [draft_sizing.MAX_LOSS] * 3)
  assert jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24).token_ids == want.token_ids


def test_tree_drafters_take_explicit_forward_sizes(tiny):
  from jaxspec.methods.token_recycling import TokenRecycling
  m = TokenRecycling(template="small", sizes="1/2/5/9", cost=(1.0, 1.0, 1.0, 1.0))
  assert m.forward_sizes == (1, 2, 5, 9) and m == TokenRecycling(template="small", sizes=(9, 5, 2, 1), cost=m.cost)
  assert TokenRecycling(template="small", adaptive=False, sizes="1/2/9").forward_sizes == (9,)
  with pytest.raises(InvalidOptionError, match="end at the tree's 9 nodes"):
    TokenRecycling(template="small", sizes="1/4").forward_sizes
  with pytest.raises(InvalidOptionError, match="1/3/6"):
    TokenRecycling(template="small", sizes="1,2")
  reset_method_memory(tiny, "recycling")
  want = jaxspec.generate(tiny, PROMPTS, "ar", max_new_tokens=24)
  got = jaxspec.generate(tiny, PROMPTS, m, max_new_tokens=24)
  assert got.token_ids == want.token_ids and got.stats.tokens_per_forward > 1.0
