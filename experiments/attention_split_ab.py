"""Attention over the committed prefix + new tokens apart (the cache written after, in place) vs
the former formulation (new tokens written first, one softmax over the written cache), in one
process: decode-step time of AR and fixed-size chains (T=2, T=9) at a 1024-slot cache.

The former formulation is rebuilt here (`written_cache_attention`) and patched into the decoder;
both compile with the engine's compiler options. Interleaved per prompt, median per step.

    python experiments/attention_split_ab.py --prompts PATH [--out experiments/results/attention_split_ab.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxspec
from jaxspec import engine
import jaxspec.models.decoder as dec
from jaxspec.bench import load_prompts
from jaxspec.machine import machine_info
from jaxspec.methods import get_method
from jaxspec.methods.prompt_lookup import PromptLookup
from jaxspec.models.kv_cache import write_scratch
from jaxspec.sampling import SamplingConfig

NEG = -1e30


def written_cache_attention(q, kc, vc, lengths, mask, kn, vn, impl=None):
  """The former contract: new K/V written into the cache first, then one masked softmax over it."""
  kc, vc = write_scratch(kc, kn, lengths), write_scratch(vc, vn, lengths)
  B, T, H, D = q.shape
  K, S = kc.shape[1], kc.shape[2]
  q_BxKxGxTxD = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
  s = jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxTxD, kc, preferred_element_type=jnp.float32) * D**-0.5
  rel_BxS = jnp.arange(S)[None, :] - lengths[:, None]  # slot index in the scratch
  tree_BxTxT = jnp.broadcast_to(mask.astype(bool), (B, T, T))
  tree_BxTxS = jnp.take_along_axis(tree_BxTxT, jnp.clip(rel_BxS, 0, T - 1)[:, None, :].repeat(T, axis=1), axis=2)
  allowed_BxTxS = (rel_BxS < 0)[:, None, :] | (((rel_BxS >= 0) & (rel_BxS < T))[:, None, :] & tree_BxTxS)
  p = jax.nn.softmax(jnp.where(allowed_BxTxS[:, None, None], s, NEG), -1)
  o = jnp.einsum("bkgts,bksd->bkgtd", p, vc, preferred_element_type=jnp.float32)
  return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--num-prompts", type=int, default=3)
  ap.add_argument("--max-new-tokens", type=int, default=96)
  ap.add_argument("--cache-len", type=int, default=1024)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "attention_split_ab.json"))
  a = ap.parse_args()
  b = jaxspec.load_model("smollm2-135m-instruct", progress=False)
  prompts = load_prompts(a.prompts, per_category=1)[: a.num_prompts]
  ids_list = [jaxspec.api.encode_prompts(b, [p["prompt"]])[0] for p in prompts]
  methods = {"ar": get_method("ar"), "chain T=2": PromptLookup(k=1, sizes=(2,)),
             "chain T=9": PromptLookup(k=8, sizes=(9,))}

  def state_for(m, ids):
    P, S, steps = engine.plan_sizes([len(ids)], a.max_new_tokens, m, b.config.max_position_embeddings,
                                    cache_len=a.cache_len)
    return P, steps, engine.init_state(b.config, [ids], a.max_new_tokens, m, jax.random.key(0), S, steps, b.dtype)

  compiled, new_attention = {}, dec.tree_attention
  for variant, fn in (("split (now)", new_attention), ("written cache (before)", written_cache_attention)):
    dec.tree_attention = fn
    jax.clear_caches()
    for name, m in methods.items():
      P, steps, st = state_for(m, ids_list[0])
      pre = engine.prefill_jit.lower(b.params, st, graphdef=b.graphdef, prompt_len=P, sampling=SamplingConfig(),
                                     eos_ids=(), method=None).compile()
      run = engine.run_steps_jit.lower(b.params, st, jnp.asarray(steps), graphdef=b.graphdef, method=m,
                                       sampling=SamplingConfig(), eos_ids=()).compile()
      compiled[(variant, name)] = (pre, run)
  dec.tree_attention = new_attention
  per_step = {k: [] for k in compiled}
  for _ in range(a.rounds):
    for ids in ids_list:
      for (variant, name), (pre, run) in compiled.items():
        _, steps, st = state_for(methods[name], ids)
        st = jax.block_until_ready(pre(b.params, st))
        t0 = time.perf_counter()
        st = jax.block_until_ready(run(b.params, st, jnp.asarray(steps)))
        per_step[(variant, name)].append((time.perf_counter() - t0) / int(st.step))
  report = {"machine": machine_info(), "cache_len": a.cache_len, "prompt_lens": [len(i) for i in ids_list],
            "rounds": a.rounds, "load_avg": os.getloadavg(), "rows": {}}
  for name in methods:
    before, now = per_step[("written cache (before)", name)], per_step[("split (now)", name)]
    row = {"before_ms": 1e3 * statistics.median(before), "now_ms": 1e3 * statistics.median(now),
           "now_over_before": statistics.median([x / y for x, y in zip(now, before)])}
    report["rows"][name] = row
    print(f"{name:10s} before {row['before_ms']:6.2f} ms/step  now {row['now_ms']:6.2f}  now/before {row['now_over_before']:.3f}")
  Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
