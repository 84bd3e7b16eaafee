"""prompt_lookup.lookup_continuation: the k tokens after the latest earlier match of the row's
last n tokens, longest n first; per row; nothing past the committed tokens."""

import jax.numpy as jnp
import numpy as np

from jaxspec.methods.prompt_lookup import lookup_continuation


def _lookup(rows, k, max_ngram=3, min_ngram=1, width=16):
  toks = np.zeros((len(rows), width), np.int32)
  for b, r in enumerate(rows):
    toks[b, :len(r)] = r
  draft, valid, _ = lookup_continuation(jnp.asarray(toks), jnp.asarray([len(r) for r in rows], jnp.int32), k,
                                     max_ngram, min_ngram)
  return [[int(t) for t, v in zip(d, ok) if v] for d, ok in zip(np.asarray(draft), np.asarray(valid))]


def test_latest_match_of_the_longest_ngram_wins():
  # tail [7, 8]: the bigram occurs at 1..2 (followed by 9, 4) and at 5..6 (followed by 5, 3);
  # the latest occurrence wins
  assert _lookup([[1, 7, 8, 9, 4, 7, 8, 5, 3, 7, 8]], k=2) == [[5, 3]]
  # the trigram [2, 7, 8] occurs only early: it beats the later unigram/bigram matches
  assert _lookup([[2, 7, 8, 9, 1, 7, 8, 6, 2, 7, 8]], k=2) == [[9, 1]]
  # min_ngram=2 ignores unigram-only matches
  assert _lookup([[5, 1, 2, 3, 5]], k=3, min_ngram=2) == [[]]
  assert _lookup([[5, 1, 2, 3, 5]], k=3, min_ngram=1) == [[1, 2, 3]]


def test_rows_are_independent_and_drafts_stop_at_the_committed_end():
  got = _lookup([[4, 5, 6, 4, 5], [9, 9], [1, 2, 3]], k=4)
  assert got[0] == [6, 4, 5]  # after the match [4, 5] come 6 then the tail itself, then nothing
  assert got[1] == [9]  # [9] matched at 0: its continuation is the last token
  assert got[2] == []  # no earlier occurrence of anything
