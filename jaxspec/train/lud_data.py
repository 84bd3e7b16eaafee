"""LUD training samples: a sequence plus placeholder copies of its units (METHODS.md, LUD).

A placeholder at position p stands in for the unknown token y_p and is trained on y_{p+1},
so the decoder's input at inference, [last committed token, placeholder x (k-1)], predicts k
tokens in one forward. Layout of one example (T = window + placeholder budget slots):

* slots 0..n-1: the real tokens y_0..y_{n-1} at positions 0..n-1, causal among themselves,
  never attending a placeholder; target y_{i+1} (the normal AR loss), weight 1 (last: 0);
* then one block per chosen unit (start s, length L): placeholders at positions
  s..s+m-1, m = min(L, k-1); each attends the real tokens before s (slots 0..s-1) and the
  block's placeholders up to itself. Targets y_{s+1}..y_{s+m}: the unit's tokens after its
  first (which the real token y_{s-1} predicts), and where m = L the token after the unit
  (the boundary, low confidence by construction: it teaches the decoder where to stop);
* padding: attends itself only, weight 0.

Chosen units: every multi-token unit, plus as many single-token units (their one
placeholder learns "not confident here"), in a seeded random order, while the budget lasts.
"""

from __future__ import annotations

import numpy as np

from jaxspec.errors import InvalidOptionError


def reconfigure(tokens: list[int], units: list[tuple[int, int]], k: int, placeholder_id: int, window: int,
                budget: int, seed: int = 0) -> dict[str, np.ndarray]:
  """One training example: tokens, positions [T] int32, mask [T, T] bool, targets [T] int32,
  weight [T] float32, is_placeholder [T] bool; T = window + budget."""
  n = len(tokens)
  if n > window:
    raise InvalidOptionError(f"sequence of {n} tokens is longer than the window {window}")
  if k < 2:
    raise InvalidOptionError(f"LUD needs k >= 2 (a unit of one token needs no placeholder), got {k}")
  T = window + budget
  toks = np.zeros(T, np.int32)
  pos = np.zeros(T, np.int32)
  mask = np.eye(T, dtype=bool)
  tgt = np.zeros(T, np.int32)
  w = np.zeros(T, np.float32)
  ph = np.zeros(T, bool)
  toks[:n], pos[:n] = tokens, np.arange(n)
  mask[:n, :n] = np.tril(np.ones((n, n), bool))
  tgt[:n - 1], w[:n - 1] = tokens[1:], 1.0
  rng = np.random.default_rng([seed, n, len(units)])
  multi = [u for u in units if u[1] > 1 and u[0] + 1 < n]
  single = [u for u in units if u[1] == 1 and u[0] + 1 < n]
  pick = list(rng.permutation(len(single))[:len(multi)])
  chosen = multi + [single[i] for i in pick]
  order = rng.permutation(len(chosen))
  at = window
  for i in order:
    s, L = chosen[i]
    m = min(L, k - 1, n - 1 - s)  # targets must exist
    if m < 1 or at + m > T:
      continue
    slots = np.arange(at, at + m)
    toks[slots], pos[slots], ph[slots] = placeholder_id, s + np.arange(m), True
    mask[slots, :s] = True
    mask[at:at + m, at:at + m] = np.tril(np.ones((m, m), bool))
    tgt[slots], w[slots] = np.asarray(tokens)[s + 1:s + 1 + m], 1.0
    at += m
  return {"tokens": toks, "positions": pos, "mask": mask, "targets": tgt, "weight": w, "is_placeholder": ph}


def reconfigure_all(sequences, units_per_seq, k: int, placeholder_id: int, window: int, budget: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Stacked examples ([N, ...] arrays) for an ArrayDataset."""
  rows = [reconfigure(t, u, k, placeholder_id, window, budget, seed) for t, u in zip(sequences, units_per_seq)]
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
