"""Hidden-transfer heads on prompts they never saw, teacher-forced (no timing, so it can run on a
busy machine): the base model writes 128 tokens per prompt (greedy, and sampled at temperature
0.7), then every position of the output is an anchor and the heads draft the next k tokens
exactly as decoding does (`pseudo_logits` over the anchor's prefix, the pending token given).

Reported per heads folder:
* greedy: top-1 agreement by offset with the base model's tokens, and the chain a greedy step
  would accept (how many leading offsets are all right: MAT of a k-chain = 1 + its mean);
* sampled: the mean probability (temperature 0.7) the base model gives the heads' top-1 draft
  at each offset in the true context: a deterministic draft is accepted with that probability.

    python experiments/ht_heldout_accuracy.py --prompts spec_bench_dev.jsonl --heads DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "ht_heldout_accuracy.json"


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--per-category", type=int, default=2, help="the bench's held-out prompts (first N per category)")
  ap.add_argument("--heads", nargs="+", required=True)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxspec
  from jaxspec import api, bench
  from jaxspec.heads_file import load_params_file
  from jaxspec.machine import machine_info
  from jaxspec.methods.hidden_transfer import KIND, pseudo_logits
  from jaxspec.models.kv_cache import KVCache, init_cache

  bundle = jaxspec.load_model(args.model, progress=False)
  c = bundle.config
  prompts = bench.load_prompts(args.prompts, per_category=args.per_category)
  ids = [api.encode_prompts(bundle, [p["prompt"]])[0] for p in prompts]
  S = max(len(i) for i in ids) + args.new_tokens
  S = -(-S // 64) * 64
  seqs = {}
  for mode, temp in (("greedy", 0.0), ("t07", 0.7)):
    out = api.generate(bundle, ids, "ar", max_new_tokens=args.new_tokens, temperature=temp, seed=0)
    seqs[mode] = [p + o for p, o in zip(ids, out.token_ids)]

  def scorer(layer: int):
    @jax.jit
    def score(params, heads, empty_cache, toks_1xS, anchors_A):  # the cache is an argument: never constant-folded
      model = nnx.merge(bundle.graphdef, params)
      pos = jnp.arange(S, dtype=jnp.int32)[None]
      logits, hidden, cache = model(empty_cache, toks_1xS, pos, None, capture=(layer - 1,))
      h_SxE = hidden[layer - 1][0]
      p07_SxV = jax.nn.softmax(logits[0] / 0.7, axis=-1)

      def one(n):
        cc = KVCache(k=cache.k, v=cache.v, lengths=jnp.reshape(n + 1, (1,)).astype(jnp.int32))
        lg = pseudo_logits(model, heads, cc, h_SxE[n][None], layer, pending_B=toks_1xS[0, n + 1][None])[0]
        return jnp.argmax(lg, axis=-1)  # [k]

      top_AxK = jax.lax.map(one, anchors_A)
      K = top_AxK.shape[1]
      at_AxK = anchors_A[:, None] + 1 + jnp.arange(K)[None]  # the base model's distribution at n+1+i
      p_AxK = jnp.take_along_axis(p07_SxV[at_AxK], top_AxK[..., None], axis=-1)[..., 0]
      return top_AxK, p_AxK
    return score

  report = {"machine": machine_info(), "prompts": len(prompts), "new_tokens": args.new_tokens, "heads": {}}
  if Path(args.out).exists():
    report["heads"] = json.loads(Path(args.out).read_text()).get("heads", {})
  empty = init_cache(c, 1, S, bundle.dtype)
  for folder in args.heads:
    params, meta = load_params_file(folder, bundle, KIND)
    heads = {n: jnp.asarray(v) for n, v in params.items()}
    K, layer = int(meta["k"]), int(meta["layer"])
    score = scorer(layer)
    right, chains, p_sum, n_anchor = np.zeros(K), [], np.zeros(K), 0
    for mode in ("greedy", "t07"):
      for p, seq in zip(ids, seqs[mode]):
        toks = np.zeros((1, S), np.int32)
        toks[0, :len(seq)] = seq
        anchors = np.arange(len(p) - 1, len(seq) - 1 - K)  # anchor n: token n+1 pending, n+2.. drafted
        if len(anchors) == 0:
          continue
        padded = np.pad(anchors, (0, args.new_tokens - len(anchors)), mode="edge")  # one shape: one compile
        top, prob = (np.asarray(x)[:len(anchors)] for x in score(bundle.params, heads, empty, jnp.asarray(toks),
                                                                 jnp.asarray(padded)))
        if mode == "greedy":
          target = np.stack([np.asarray(seq)[anchors + 2 + i] for i in range(K)], axis=1)
          ok = top == target
          right += ok.sum(0)
          chains += list(np.argmin(np.concatenate([ok, np.zeros((len(ok), 1), bool)], axis=1), axis=1))
          n_anchor += len(anchors)
        else:
          p_sum += prob.sum(0)
    n_t07 = sum(max(0, len(s) - len(p) - K) for p, s in zip(ids, seqs["t07"]))
    report["heads"][folder] = {
        "layer": layer, "k": K, "token_input": "U_KxExE" in heads,
        "greedy_top1_by_offset": [round(float(x), 4) for x in right / n_anchor],
        "greedy_chain_mean": round(float(np.mean(chains)), 4),
        "greedy_chain_hist": [round(float(x), 4) for x in np.bincount(chains, minlength=K + 1) / len(chains)],
        "t07_accept_by_offset": [round(float(x), 4) for x in p_sum / max(n_t07, 1)],
        "anchors": int(n_anchor)}
    print(folder, json.dumps(report["heads"][folder]))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
