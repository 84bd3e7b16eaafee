"""Teacher-forced drafts on the base model's own greedy text (shared by experiments/depth1_union.py
and experiments/dynamic_tree_sim.py; no timing).

`score_greedy_text` writes `new_tokens` greedy tokens per prompt with AR, then in one forward per
prompt keeps, at every position, the top-k next tokens and their probabilities (the Token
Recycling row that position's forward writes), and at every anchor n (token n+1 pending) the
heads' top-k drafts of token n+2 with their probabilities, exactly as decoding drafts them
(`pseudo_logits`, offset 1; over the heads' draft vocabulary when `heads` carries `vocab_N`).
"""

from __future__ import annotations

import numpy as np


def score_greedy_text(bundle, heads, layer: int, ids: list[list[int]], new_tokens: int, topk: int = 8) -> list[dict]:
  """Per prompt: {seq, plen, ri [S, k] ids, rp [S, k] probs, hi [A, k] ids, hp [A, k] probs}; row
  a of hi/hp is the anchor plen - 1 + a (the first: the prompt's last token, pending plen)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxspec import api
  from jaxspec.methods.hidden_transfer import pseudo_logits
  from jaxspec.models.kv_cache import KVCache, init_cache

  out = api.generate(bundle, ids, "ar", max_new_tokens=new_tokens, seed=0)
  seqs = [p + o for p, o in zip(ids, out.token_ids)]
  S = -(-(max(len(s) for s in seqs) + 1) // 64) * 64
  vocab_N = heads.get("vocab_N")

  @jax.jit
  def score(params, empty_cache, toks_1xS, anchors_A):
    model = nnx.merge(bundle.graphdef, params)
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    logits, hidden, cache = model(empty_cache, toks_1xS, pos, None, capture=(layer - 1,))
    h_SxE = hidden[layer - 1][0]

    def one(n):
      cc = KVCache(k=cache.k, v=cache.v, lengths=jnp.reshape(n + 1, (1,)).astype(jnp.int32))
      lg = pseudo_logits(model, heads, cc, h_SxE[n][None], layer, pending_B=toks_1xS[0, n + 1][None], offsets=1)
      p, i = jax.lax.top_k(jax.nn.softmax(lg[0, 0]), topk)
      return (i if vocab_N is None else vocab_N[i]), p

    rp, ri = jax.lax.top_k(jax.nn.softmax(logits[0].astype(jnp.float32)), topk)
    hi, hp = jax.lax.map(one, anchors_A)
    return ri, rp, hi, hp

  empty = init_cache(bundle.config, 1, S, bundle.dtype)
  data = []
  for p, seq in zip(ids, seqs):
    toks = np.zeros((1, S), np.int32)
    toks[0, :len(seq)] = seq
    anchors = np.arange(len(p) - 1, len(seq) - 1)
    padded = np.pad(anchors, (0, S - len(anchors)), mode="edge")
    ri, rp, hi, hp = (np.asarray(x) for x in score(bundle.params, empty, jnp.asarray(toks), jnp.asarray(padded)))
    data.append(dict(seq=np.asarray(seq), plen=len(p), ri=ri, rp=rp, hi=hi[:len(anchors)], hp=hp[:len(anchors)]))
  return data
