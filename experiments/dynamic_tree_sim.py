"""Static vs dynamic hidden-transfer trees, simulated on greedy text (no timing, runs beside other jobs).

A greedy lossless decode commits the greedy continuation, so a step's accepted length is the
deepest tree path that spells the text after the pending token. The base model writes 128 greedy
tokens per held-out prompt; teacher-forced over that text we keep, at every position, the top-8
next tokens with their probabilities (the Token Recycling row that position's forward writes),
and at every anchor the heads' top-8 depth-1 drafts with their probabilities (`pseudo_logits`,
the packaged heads with their draft vocabulary). The walk then emulates decoding step by step:
the matrix holds the rows of tokens that were in a committed forward (rows persist across
prompts in bench order), the lookup chain is `lookup_continuation`'s.

* static: the method's own template (`hidden_transfer` with `nodes`, lookup 5, recycle 8,
  root_recycle 2), filled exactly as `propose` fills it.
* dynamic: the `nodes` most probable nodes of a candidate pool, grown best first per step: the
  lookup chain (prior by matched n), depth-1 candidates (the heads' and the pending row's, with
  their probabilities), and below every node its token's matrix row (the row's stored
  probabilities). A node's score is its parent's times its own calibrated probability, so the
  chosen set is a tree (EAGLE-2's rule; DySpec grows trees the same way). Also: matrix rows keyed
  by the last two tokens (falling back to one), and how calibrated the heads' top-1 softmax is.

    python experiments/dynamic_tree_sim.py --prompts spec_bench_dev.jsonl
"""

from __future__ import annotations

import argparse
import heapq
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "dynamic_tree_sim.json"
TOPK = 8


def precompute(args):
  """The resolved default `hidden_transfer` and its heads' drafts on the prompts' greedy text."""
  import jaxspec
  from jaxspec import api, bench
  from jaxspec.methods import get_method
  from heads_on_greedy_text import score_greedy_text

  bundle = jaxspec.load_model(args.model, progress=False)
  method = get_method("hidden_transfer", adaptive=False).resolve(bundle)
  prompts = bench.load_prompts(args.prompts, per_category=args.per_category)
  ids = [api.encode_prompts(bundle, [p["prompt"]])[0] for p in prompts]
  return method, score_greedy_text(bundle, method.load_params(bundle), method.layer, ids, args.new_tokens, TOPK)


def lookup(seq, num, L, max_n=3, min_n=2):
  """(continuation tokens (<= L), matched n) as `lookup_continuation`: latest earlier match, longest n."""
  for n in range(max_n, min_n - 1, -1):
    if num < n + 1:
      continue
    tail = list(seq[num - n:num])
    for j in range(num - n - 1, -1, -1):  # window j..j+n-1, continuation j+n < num
      if list(seq[j:j + n]) == tail:
        return [int(t) for t in seq[j + n:min(j + n + L, num)]], n
  return [], 0


def walk(tokens, parents, seq, i):
  """Accepted drafts: the deepest path of the tree (tokens, parents; node 0 the root, invalid
  nodes None) spelling seq[i+1], seq[i+2], ..."""
  children = {}
  for c in range(1, len(parents)):
    if tokens[c] is not None:
      children.setdefault(parents[c], []).append(c)
  u, a = 0, 0
  while i + a + 1 < len(seq):
    nxt = next((c for c in children.get(u, []) if tokens[c] == seq[i + a + 1]), None)
    if nxt is None:
      break
    u, a = nxt, a + 1
  return a


def fill_static(method, get, d, seq, i):
  """The template filled as HiddenTransfer.propose fills it (adaptive=False)."""
  tree, slots = method._tree_and_slots
  depth, parents, T = tree.depth, tree.parents, tree.size
  tok = [None] * T
  tok[0] = int(seq[i])
  cont, _ = lookup(seq, i + 1, method.lookup)
  grafted = [False] * T
  for j, t in enumerate(cont):  # main path nodes 1..L
    tok[1 + j], grafted[1 + j] = t, True
  a = i - d["plen"]  # the anchor's index among the precomputed heads' drafts
  heads = [int(x) for x in d["hi"][a]] if a < len(d["hi"]) else []
  row = get(int(seq[i - 1]), int(seq[i]))
  merged = []
  for src, c in [("head", 0), ("row", 0)] + [("head", c) for c in range(1, 6)] + [("row", 1)]:
    t = heads[c] if src == "head" else (int(row[0][c]) if row is not None else None)
    if t is not None and t not in merged:
      merged.append(t)
  for v in range(1, T):
    if grafted[v]:
      continue
    if depth[v] == 1:
      tok[v] = merged[slots[v]] if slots[v] < len(merged) else None
    else:
      pt = tok[parents[v]]
      ppt = tok[parents[parents[v]]] if parents[v] > 0 else int(seq[i])
      r = get(ppt, pt) if pt is not None else None
      tok[v] = int(r[0][slots[v]]) if r is not None else None
  return tok, list(parents)


def fill_dynamic(method, get, d, seq, i, nodes, head_scale, row_scale):
  """Best-first: the `nodes` highest-scoring candidates (score = parent's x own calibrated prob)."""
  from jaxspec.methods.prompt_lookup import prior_accept
  cont, n = lookup(seq, i + 1, method.lookup)
  tok, parents = [int(seq[i])], [-1]
  heap, counter = [], 0

  def push(s, parent, t, chain):
    nonlocal counter
    heapq.heappush(heap, (-s, counter, parent, t, chain))
    counter += 1

  prior = prior_accept(n, len(cont))
  a = i - d["plen"]
  if cont:
    push(prior[0], 0, cont[0], 1)
  row = get(int(seq[i - 1]), int(seq[i]))
  if a < len(d["hi"]):
    for t, p in zip(d["hi"][a], d["hp"][a]):
      push(head_scale(float(p)), 0, int(t), 0)
  if row is not None:
    for t, p in zip(*row):
      push(row_scale(float(p)), 0, int(t), 0)
  kids = {}  # parent -> tokens already chosen
  while len(tok) - 1 < nodes and heap:
    neg, _, parent, t, chain = heapq.heappop(heap)
    if t in kids.setdefault(parent, set()):
      continue
    kids[parent].add(t)
    v = len(tok)
    tok.append(t)
    parents.append(parent)
    if chain and chain < len(cont):
      push(-neg * prior[chain], v, cont[chain], chain + 1)
    r = get(tok[parent], t)
    if r is not None:
      for t2, p2 in zip(*r):
        push(-neg * row_scale(float(p2)), v, int(t2), 0)
  return tok, parents


def simulate(data, tree_fn, bigram=False):
  """Decoding emulated prompt by prompt; `bigram`: matrix rows keyed by the last two tokens first."""
  matrix, matrix2 = {}, {}
  steps = tokens = 0
  depth_hits = np.zeros(16)

  def get(prev, t):
    if bigram and (prev, t) in matrix2:
      return matrix2[(prev, t)]
    return matrix.get(t)

  for d in data:
    seq, plen = d["seq"], d["plen"]
    i = plen  # the pending token: the first new token (from the prefill)
    matrix[int(seq[plen - 1])] = (d["ri"][plen - 1], d["rp"][plen - 1])
    while i < len(seq) - 1:
      tok, parents = tree_fn(get, d, seq, i)
      a = walk(tok, parents, seq, i)
      depth_hits[:a] += 1
      for j in range(i, min(i + a + 1, len(seq))):  # the forward held the root and the accepted nodes
        matrix[int(seq[j])] = matrix2[(int(seq[j - 1]), int(seq[j]))] = (d["ri"][j], d["rp"][j])
      steps += 1
      tokens += a + 1
      i += a + 1
  return {"mat": round(tokens / steps, 3), "steps": steps,
          "accept_by_depth": [round(float(x / steps), 3) for x in depth_hits[:8]]}


def head_calibration(data):
  """How often the heads' top-1 is the next token, by its softmax probability."""
  p, right = [], []
  for d in data:
    seq, plen = d["seq"], d["plen"]
    for a in range(len(d["hi"])):
      if plen + a + 1 < len(seq):
        p.append(float(d["hp"][a][0]))
        right.append(bool(d["hi"][a][0] == seq[plen + a + 1]))
  p, right = np.asarray(p), np.asarray(right)
  bins = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 0.95), (0.95, 1.01)]
  return [{"p": [lo, hi], "steps": int(((p >= lo) & (p < hi)).sum()),
           "right": round(float(right[(p >= lo) & (p < hi)].mean()), 3)} for lo, hi in bins if ((p >= lo) & (p < hi)).any()]


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--per-category", type=int, default=2)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--cache", default="/tmp/dynamic_tree_sim.npz")
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()
  import dataclasses
  import pickle

  cache = Path(args.cache)
  if cache.exists():
    method, data = pickle.loads(cache.read_bytes())
  else:
    method, data = precompute(args)
    cache.write_bytes(pickle.dumps((method, data)))
  from jaxspec.machine import machine_info
  report = {"machine": machine_info(), "prompts": len(data), "runs": {}}
  report["head_top1_calibration"] = head_calibration(data)
  print("heads' top-1 calibration", report["head_top1_calibration"], flush=True)
  for nodes in (12, 15):
    m = dataclasses.replace(method, nodes=nodes)
    m.__dict__.pop("_tree_and_slots", None)
    for bigram in (False, True):
      tag = "_bigram" if bigram else ""
      r = simulate(data, lambda g, d, s, i: fill_static(m, g, d, s, i), bigram)
      report["runs"][f"static{nodes}{tag}"] = r
      print(f"static {nodes}{tag}", r, flush=True)
      for name, hs, rs in (("raw", lambda p: p, lambda p: p),
                           ("row0.6", lambda p: p, lambda p: 0.6 * p),
                           ("sqrt", lambda p: p ** 0.5, lambda p: 0.6 * p ** 0.5)):
        if bigram and name != "row0.6":
          continue
        r = simulate(data, lambda g, d, s, i: fill_dynamic(m, g, d, s, i, nodes, hs, rs), bigram)
        report["runs"][f"dynamic{nodes}_{name}{tag}"] = r
        print(f"dynamic {nodes} {name}{tag}", r, flush=True)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
