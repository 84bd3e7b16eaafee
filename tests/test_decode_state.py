"""decode_state.append_tokens: per-row counts cut at the first EOS (kept) and at the row's token
budget; done rows append nothing."""

import jax.numpy as jnp

from jaxspec.decode_state import DecodeState, append_tokens, last_tokens


def _state(num_tokens, prompt_lens, max_new, done=(False, False, False)):
  B = len(num_tokens)
  toks = jnp.arange(B * 12, dtype=jnp.int32).reshape(B, 12) + 100
  return DecodeState(tokens=toks, num_tokens=jnp.asarray(num_tokens), prompt_lens=jnp.asarray(prompt_lens),
                     max_new=jnp.asarray(max_new), cache=None, key=None, done=jnp.asarray(done),
                     step=jnp.zeros((), jnp.int32), max_steps=jnp.asarray(9), forwards=jnp.ones((B,), jnp.int32),
                     forward_tokens=jnp.zeros((), jnp.int32), accept_hist=jnp.zeros((5,), jnp.int32))


def test_eos_and_budget_cut_each_row():
  st = _state([3, 3, 3], [2, 2, 2], [10, 2, 10], done=(False, False, True))
  new = jnp.asarray([[5, 7, 6, 5], [5, 6, 7, 8], [5, 6, 7, 8]], jnp.int32)
  out, n = append_tokens(st, new, jnp.asarray([4, 4, 4]), eos_ids=(7,))
  assert n.tolist() == [2, 1, 0]  # row 0: cut after its EOS; row 1: one token left in its budget; row 2: done
  assert out.num_tokens.tolist() == [5, 4, 3]
  assert out.done.tolist() == [True, True, True]  # EOS, budget, already done
  assert out.tokens[0, 3:5].tolist() == [5, 7] and out.tokens[1, 3].tolist() == 5
  assert last_tokens(out).tolist() == [7, 5, int(st.tokens[2, 2])]


def test_no_eos_ids_means_no_cut():
  st = _state([3, 3, 3], [2, 2, 2], [10, 10, 10])
  out, n = append_tokens(st, jnp.full((3, 3), 7, jnp.int32), jnp.asarray([3, 1, 2]), eos_ids=())
  assert n.tolist() == [3, 1, 2] and not out.done.any()


def test_record_step_counts_active_rows_only():
  from jaxspec.decode_state import record_step
  st = record_step(_state([3, 3, 3], [2, 2, 2], [10, 10, 10]), jnp.asarray([3, 0, 1]), 4)
  st = record_step(st, jnp.asarray([1, 0, 1]), 1)
  assert st.accept_hist.tolist() == [0, 3, 0, 1, 0] and st.forwards.tolist() == [3, 1, 3] and int(st.step) == 2
  assert int(st.forward_tokens) == 5
