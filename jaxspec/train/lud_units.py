"""Lexical-unit mining (LUD, Sun et al. 2024): where a model is sure of several tokens in a row.

Teacher-force the model over each sequence: p_i = P(y_i | y_<i). A token is *confident* when
p_i > alpha and y_i is the model's argmax. Units are the maximal runs of confident tokens, cut
into pieces of at most k; every other token is a unit of its own. Units tile each sequence
from position 1 (position 0 has no prediction).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.errors import InvalidOptionError


def token_confidence(bundle, sequences: list[list[int]], batch_size: int = 8, progress: bool = True):
  """Per sequence: (p [n] float32, is_argmax [n] bool) with p[0] = 0, is_argmax[0] = False."""
  graphdef = bundle.graphdef
  S = max(len(s) for s in sequences)
  S = int(np.ceil(S / 32) * 32)

  @jax.jit
  def forward(params, toks_BxS):
    B = toks_BxS.shape[0]
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    logits, _, _ = nnx.merge(graphdef, params)(None, toks_BxS, pos, None)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nxt = toks_BxS[:, 1:]
    p = jnp.exp(jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0])
    return p, jnp.argmax(logp, axis=-1) == nxt

  out = []
  starts = range(0, len(sequences), batch_size)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(sequences), desc="teacher pass", dynamic_ncols=True)
  for s in starts:
    chunk = sequences[s:s + batch_size]
    toks = np.zeros((batch_size, S), np.int32)
    for i, seq in enumerate(chunk):
      toks[i, :len(seq)] = seq
    p, am = jax.device_get(forward(bundle.params, jnp.asarray(toks)))
    for i, seq in enumerate(chunk):
      n = len(seq)
      out.append((np.concatenate([[0.0], p[i, :n - 1]]).astype(np.float32),
                  np.concatenate([[False], am[i, :n - 1]]).astype(bool)))
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  return out


def mine_units(p_N: np.ndarray, is_argmax_N: np.ndarray, alpha: float, k: int) -> list[tuple[int, int]]:
  """(start, length) of each unit, tiling positions 1..n-1 in order."""
  if not 0.0 <= alpha < 1.0 or k < 1:
    raise InvalidOptionError(f"mining needs 0 <= alpha < 1 and k >= 1, got alpha={alpha}, k={k}")
  confident = (p_N > alpha) & is_argmax_N
  units, i, n = [], 1, len(p_N)
  while i < n:
    if confident[i]:
      j = i
      while j < n and confident[j] and j - i < k:
        j += 1
      units.append((i, j - i))
      i = j
    else:
      units.append((i, 1))
      i += 1
  return units


def unit_stats(units_per_seq: list[list[tuple[int, int]]], k: int) -> dict:
  """Unit-length histogram (index = length) and the share of tokens inside multi-token units."""
  hist = Counter(length for units in units_per_seq for _, length in units)
  tokens = sum(length * c for length, c in hist.items())
  multi = sum(length * c for length, c in hist.items() if length > 1)
  return {"length_hist": [hist.get(i, 0) for i in range(k + 1)], "tokens": tokens,
          "share_in_multi_token_units": multi / tokens if tokens else 0.0,
          "mean_unit_length": tokens / max(sum(hist.values()), 1)}


def mining_report(confidence, categories: list[str], alphas, k: int) -> dict:
  """Statistics for each alpha, overall and per category (a sweep costs no extra forward)."""
  report = {}
  for a in alphas:
    units = [mine_units(p, am, a, k) for p, am in confidence]
    by_cat = {}
    for cat in sorted(set(categories)):
      by_cat[cat] = unit_stats([u for u, c in zip(units, categories) if c == cat], k)
    report[str(a)] = {"overall": unit_stats(units, k), "by_category": by_cat}
  return report


def plot_report(report: dict, path: Path, k: int) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  for alpha, r in report.items():
    h = np.asarray(r["overall"]["length_hist"][1:], float)
    a1.plot(range(1, k + 1), h / h.sum(), "o-", label=f"alpha={alpha}")
  a1.set_xlabel("unit length"), a1.set_ylabel("share of units"), a1.set_yscale("log"), a1.legend(fontsize=7)
  alphas = sorted(report, key=float)
  cats = sorted(report[alphas[0]]["by_category"])
  for cat in cats:
    a2.plot([float(a) for a in alphas], [report[a]["by_category"][cat]["share_in_multi_token_units"] for a in alphas],
            "o-", label=cat)
  a2.set_xlabel("alpha"), a2.set_ylabel("tokens inside multi-token units"), a2.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def save_units(path: Path, rows: list[dict], units_per_seq, meta: dict) -> None:
  """JSONL of {question_id, category, tokens, units: [[start, length], ...]} + a meta line first."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  with tmp.open("w") as f:
    f.write(json.dumps({"meta": meta}) + "\n")
    for r, units in zip(rows, units_per_seq):
      f.write(json.dumps({"question_id": r.get("question_id"), "category": r.get("category"),
                          "tokens": r["tokens"], "units": [list(u) for u in units]}) + "\n")
  tmp.replace(path)
