"""Would a drafter that reads its own previous draft (EAGLE/Hydra-style) reach the depth >= 2
acceptance the hidden-transfer heads cannot? Teacher-forced, no timing: a feasibility check
before any decoding code is written.

The drafter g maps (z_n, embedding of token n+1) to z_{n+1}, where z is the base model's final
hidden state after the final norm (what the LM head reads): draft logits = LM head(g(...)).
Chained on its own outputs, z_{n+1}^ -> z_{n+2}^ ..., it drafts a path whose every token
conditions on the ones before it. At decode time the root z_n is the verified forward's state
of the last accepted node and token n+1 is the pending token, so depth 1 drafts token n+2 (the
heads' offset 1). g: one fused linear over [z, e] (initialised to pass z through), then either
`--arch mlp`: `blocks` pre-norm SwiGLU MLP blocks (~3.3M parameters each; no attention), or
`--arch attn` (EAGLE's shape): a trainable copy of the base model's last block, attending to the
context's real K/V of that block (already in the cache when decoding) and to the chain's own
earlier drafts, then the final norm.

Training (self-distillation, `jaxspec.train.trainer.train`: optax, orbax checkpoints, resumable):
anchors of the distilled greedy sequences; `unroll` steps each fed the previous step's own
output (as decoding does), loss = KL(teacher top-32 at n+d || drafter) averaged over steps.
Eval: the base model's greedy text of the 26 held-out bench prompts; per anchor, the greedy
chain (top-1 by depth, given all earlier depths right) and top-3 coverage at depth 1. Beside it,
each source's chain on the true path: the drafter fed the true tokens, the Token Recycling matrix
(each token's row = the top ids of its latest processed position, kept across prompts), its
top-2, and the union of the drafter's and the matrix's top-1 (two candidates a depth, as the
matrix's top-2): which second candidate a tree should hang under each node.

    python experiments/sequential_draft_sim.py --data runs/distill --prompts spec_bench_dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "sequential_draft_sim.json"
DEPTH = 4  # chain depth evaluated


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--data", nargs="+", required=True, help="`jaxspec distill` folders")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--per-category", type=int, default=2)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--blocks", type=int, default=1)
  ap.add_argument("--arch", choices=("mlp", "attn"), default="mlp")
  ap.add_argument("--unroll", type=int, default=3)
  ap.add_argument("--window", type=int, default=256)
  ap.add_argument("--workdir", default="runs/sequential_draft")
  ap.add_argument("--out", default=str(OUT))
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxspec
  from jaxspec import api, bench
  from jaxspec.distill import read_distilled
  from jaxspec.machine import machine_info
  from jaxspec.models.decoder import rms_norm
  from jaxspec.models.kv_cache import init_cache, write_scratch
  from jaxspec.models.rope import rope_cos_sin
  from jaxspec.train.data import ArrayDataset, held_out_groups
  from jaxspec.train.trainer import TrainConfig, train

  bundle = jaxspec.load_model(args.model, progress=False)
  c = bundle.config
  E, eps = c.embed_dim, c.rms_norm_eps
  model = nnx.merge(bundle.graphdef, bundle.params)
  # arguments of every jitted function, never closed over (they would become compile-time constants)
  lm = {"embed_VxE": jnp.asarray(model.embed_VxE[...], jnp.float32), "head_ExV": model.head_columns(jnp.arange(c.vocab_size))}

  def teacher_pass(seqs: list[list[int]], S: int, top_k: int = 32, batch: int = 8):
    """z [N, S, E] (final-normed last state), top ids/logp [N, S, top_k] of each sequence."""
    @jax.jit
    def run(params, empty, toks_BxS):
      m = nnx.merge(bundle.graphdef, params)
      pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), toks_BxS.shape)
      logits, hidden, cache = m(empty, toks_BxS, pos, None, capture=(-1,))
      z = rms_norm(hidden[c.num_layers - 1], m.final_norm_E[...], eps)
      lp, ids = jax.lax.top_k(jax.nn.log_softmax(logits, -1), top_k)
      return z.astype(jnp.float32), ids.astype(jnp.int32), lp, cache.k[-1], cache.v[-1]

    toks = np.zeros((len(seqs), S), np.int32)
    for i, s in enumerate(seqs):
      toks[i, :len(s)] = s[:S]
    empty = init_cache(c, batch, S, bundle.dtype)
    parts = []
    for s in range(0, len(seqs), batch):
      chunk = toks[s:s + batch]
      out = run(bundle.params, empty, jnp.asarray(np.pad(chunk, ((0, batch - len(chunk)), (0, 0)))))
      parts.append([np.asarray(x)[:len(chunk)] for x in out])
    z, ids, lp, kl, vl = (np.concatenate(xs) for xs in zip(*parts))
    return toks, z, ids, lp, kl, vl  # kl, vl: [N, K, S, D] the last block's K/V

  # ---- the drafter ----
  H = c.mlp_dim

  last_gd, last_state = nnx.split(model.blocks[c.num_layers - 1])

  def init(key):
    ks = jax.random.split(key, 2 + 3 * args.blocks)
    p = {"A_ExE": jnp.eye(E), "B_ExE": 0.02 * jax.random.normal(ks[0], (E, E)), "b_E": jnp.zeros(E),
         "out_E": jnp.asarray(model.final_norm_E[...], jnp.float32), "blocks": []}
    if args.arch == "attn":
      p["last"] = jax.tree.map(lambda x: jnp.array(x, jnp.float32), last_state.to_pure_dict())
      return p
    for j in range(args.blocks):
      k1, k2 = ks[2 + 3 * j], ks[3 + 3 * j]
      p["blocks"].append({"norm_E": jnp.ones(E), "gate_ExH": 0.02 * jax.random.normal(k1, (E, H)),
                          "up_ExH": 0.02 * jax.random.normal(k2, (E, H)), "down_HxE": jnp.zeros((H, E))})
    return p

  def step(p, lm, z_BxE, tok_B, ctx=None):
    """z_{n} and token n+1 -> z_{n+1}^ (post-norm: what the LM head reads). `ctx` (attn): (k, v
    [B, K, S, D] the last block's cache, lengths [B] = slot of this draft) -> also the new k, v."""
    x = z_BxE @ p["A_ExE"] + lm["embed_VxE"][tok_B] @ p["B_ExE"] + p["b_E"]
    if args.arch == "attn":
      k, v, lengths = ctx
      st = jax.tree.map(lambda x: x, last_state)
      nnx.replace_by_pure_dict(st, p["last"])
      block = nnx.merge(last_gd, st)
      cos, sin = rope_cos_sin(lengths[:, None], c.head_dim, c.rope_theta)
      y, k, v = block(x[:, None], cos, sin, k, v, lengths, jnp.ones((1, 1), bool), "auto")
      return rms_norm(y[:, 0], p["out_E"], eps), (k, v, lengths + 1)
    for blk in p["blocks"]:
      y = rms_norm(x, blk["norm_E"], eps)
      x = x + (jax.nn.silu(y @ blk["gate_ExH"]) * (y @ blk["up_ExH"])) @ blk["down_HxE"]
    return rms_norm(x, p["out_E"], eps)

  # ---- training data: anchors n of the distilled sequences with n + unroll + 1 < length ----
  manifest, rows = read_distilled(args.data, bundle)
  seqs = [(r["prompt_ids"] + r["output_ids"])[-args.window:] for r in rows]
  t0 = time.perf_counter()
  toks, z, ids, lp, kl, vl = teacher_pass(seqs, args.window)
  teacher_s = time.perf_counter() - t0
  print(f"teacher pass: {len(seqs)} sequences in {teacher_s:.0f} s", flush=True)
  U = args.unroll
  seq_a, pos_a = [], []
  for i, s in enumerate(seqs):
    last = len(s) - 2 - U  # anchor n needs tokens n+1..n+U and teacher rows n+1..n+U
    if last >= 0:
      seq_a.append(np.full(last + 1, i, np.int32))
      pos_a.append(np.arange(last + 1, dtype=np.int32))
  anchors = ArrayDataset({"seq": np.concatenate(seq_a), "pos": np.concatenate(pos_a)})
  is_eval = held_out_groups([str(rows[i]["question_id"]) for i in anchors.arrays["seq"]], 0.08, 0)
  train_set = ArrayDataset({k: v[~is_eval] for k, v in anchors.arrays.items()})
  mix = np.random.default_rng(8).permutation(int(is_eval.sum()))
  eval_set = ArrayDataset({k: v[is_eval][mix] for k, v in anchors.arrays.items()})
  frozen = {"toks": jnp.asarray(toks), "z": jnp.asarray(z), "ids": jnp.asarray(ids), "lp": jnp.asarray(lp), "lm": lm}
  if args.arch == "attn":
    frozen.update(kl=jnp.asarray(kl), vl=jnp.asarray(vl))
  del kl, vl

  two = lambda out: out if isinstance(out, tuple) else (out, None)

  def loss(p, fr, batch):
    seq, n = batch["seq"], batch["pos"]
    zc = fr["z"][seq, n]
    ctx = (fr["kl"][seq], fr["vl"][seq], n + 1) if args.arch == "attn" else None
    kls, metrics = [], {}
    for d in range(1, U + 1):
      zc, ctx = two(step(p, fr["lm"], zc, fr["toks"][seq, n + d], ctx))  # predicts the teacher's row n + d
      logq = jax.nn.log_softmax(zc @ fr["lm"]["head_ExV"], -1)
      t_ids, t_lp = fr["ids"][seq, n + d], fr["lp"][seq, n + d]
      pt = jax.nn.softmax(t_lp, -1)
      kls.append(jnp.mean(jnp.sum(pt * (jnp.log(pt + 1e-20) - jnp.take_along_axis(logq, t_ids, -1)), -1)))
      metrics[f"top1_d{d}"] = jnp.mean(jnp.argmax(logq, -1) == t_ids[:, 0])
    return jnp.mean(jnp.stack(kls)), metrics

  cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=100,
                    eval_every=500, save_every=250, weight_decay=0.0)
  t0 = time.perf_counter()
  params, log = train(loss, init(jax.random.key(0)), frozen, train_set, cfg, args.workdir, eval_data=eval_set,
                      run_info={"arch": args.arch, "blocks": args.blocks, "unroll": U, "data": manifest.get("model_fingerprint")})
  train_s = time.perf_counter() - t0

  # ---- eval: greedy chains on the held-out bench prompts' greedy text ----
  prompts = bench.load_prompts(args.prompts, per_category=args.per_category)
  pids = [api.encode_prompts(bundle, [p["prompt"]])[0] for p in prompts]
  outs = api.generate(bundle, pids, "ar", max_new_tokens=args.new_tokens, temperature=0.0).token_ids
  full = [p + o for p, o in zip(pids, outs)]
  S = -(-max(len(s) for s in full) // 64) * 64
  etoks, ez, eids, _, ekl, evl = teacher_pass(full, S)

  @jax.jit
  def chain(p, lm, z_AxE, root_A, ctx):
    zc, tok, tops, top3 = z_AxE, root_A, [], None
    for d in range(DEPTH):
      zc, ctx = two(step(p, lm, zc, tok, ctx))
      lg = zc @ lm["head_ExV"]
      if d == 0:
        top3 = jax.lax.top_k(lg, 3)[1]
      tok = jnp.argmax(lg, -1)
      tops.append(tok)
    return jnp.stack(tops, 1), top3

  @jax.jit
  def chain_on(p, lm, z_AxE, toks_AxD, ctx):
    """Top-1 at each depth with the true tokens as inputs (own states): the drafter's children of
    the true path's nodes, which is all a tree walk that follows the true path ever reads."""
    zc, tops = z_AxE, []
    for d in range(DEPTH):
      zc, ctx = two(step(p, lm, zc, toks_AxD[:, d], ctx))
      tops.append(jnp.argmax(zc @ lm["head_ExV"], -1))
    return jnp.stack(tops, 1)

  matrix = {}  # token -> top ids of its latest processed position; persists across prompts (bench order)
  src = {"drafter": np.zeros(DEPTH), "matrix_top1": np.zeros(DEPTH), "matrix_top2": np.zeros(DEPTH),
         "union_drafter_matrix_top1": np.zeros(DEPTH)}
  src_den = {k: np.zeros(DEPTH) for k in src}
  src_chain = {k: [] for k in src}
  right, cond_num, cond_den, chains, cover3, n_anchor = np.zeros(DEPTH), np.zeros(DEPTH), np.zeros(DEPTH), [], 0, 0
  for i, (pid, seq) in enumerate(zip(pids, full)):
    an = np.arange(len(pid) - 1, len(seq) - 1 - DEPTH)  # anchor n: n+1 pending, n+2.. drafted (as ht_heldout_accuracy)
    if len(an) == 0:
      continue
    ctx = None
    if args.arch == "attn":
      A = len(an)
      ctx = (jnp.broadcast_to(ekl[i], (A,) + ekl.shape[1:]), jnp.broadcast_to(evl[i], (A,) + evl.shape[1:]),
             jnp.asarray(an + 1, jnp.int32))
    top, t3 = (np.asarray(x) for x in chain(params, lm, jnp.asarray(ez[i, an]), jnp.asarray(etoks[i, an + 1]), ctx))
    target = np.stack([np.asarray(seq)[an + 2 + d] for d in range(DEPTH)], 1)
    ok = top == target
    right += ok.sum(0)
    prefix = np.cumprod(ok, 1)
    cond_den += np.concatenate([np.full((len(ok), 1), 1), prefix[:, :-1]], 1).sum(0)
    cond_num += prefix.sum(0)
    chains += list(prefix.sum(1))
    cover3 += int((t3 == target[:, :1]).any(1).sum())
    n_anchor += len(an)
    # depth d drafts seq[n+2+d] under the true node seq[n+1+d]; matrix rows as of positions <= n
    parents = np.stack([np.asarray(seq)[an + 1 + d] for d in range(DEPTH)], 1)
    mrow = np.full((len(an), DEPTH, 2), -1, np.int32)  # the parents' rows as of position n
    k = 0
    for j in range(len(pid) - 1, len(seq)):  # position j processed: its token's row is rewritten
      matrix[int(seq[j])] = eids[i, j, :2]
      while k < len(an) and an[k] == j:
        for d in range(DEPTH):
          mrow[k, d] = matrix.get(int(parents[k, d]), mrow[k, d])
        k += 1
    tf = np.asarray(chain_on(params, lm, jnp.asarray(ez[i, an]), jnp.asarray(parents), ctx))
    hits = {"drafter": tf == target, "matrix_top1": mrow[:, :, 0] == target,
            "matrix_top2": (mrow == target[:, :, None]).any(-1)}
    hits["union_drafter_matrix_top1"] = hits["drafter"] | hits["matrix_top1"]
    for name, h in hits.items():
      pre = np.cumprod(h, 1)
      src_den[name] += np.concatenate([np.full((len(h), 1), 1), pre[:, :-1]], 1).sum(0)
      src[name] += pre.sum(0)
      src_chain[name] += list(pre.sum(1))

  last_eval = next((r for r in reversed(log) if "eval_loss" in r), {})
  result = {"machine": machine_info(), "args": vars(args), "teacher_pass_s": round(teacher_s, 1),
            "train_s": round(train_s, 1), "train_anchors": len(train_set), "eval_anchors": len(eval_set),
            "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "eval_split": {k: v for k, v in last_eval.items() if k.startswith("eval")},
            "heldout": {"anchors": n_anchor,
                        "top1_by_depth_unconditional": [round(float(x), 4) for x in right / n_anchor],
                        "top1_by_depth_given_prefix": [round(float(x), 4) for x in cond_num / np.maximum(cond_den, 1)],
                        "chain_mean": round(float(np.mean(chains)), 4),
                        "depth1_top3_cover": round(cover3 / n_anchor, 4),
                        # each source's own chain on the true path (teacher-forced inputs): given the
                        # prefix right, and mean accepted of a greedy walk over <= 1-2 candidates a depth
                        "sources_given_prefix": {k: [round(float(x), 4) for x in src[k] / np.maximum(src_den[k], 1)]
                                                 for k in src},
                        "sources_chain_mean": {k: round(float(np.mean(v)), 4) for k, v in src_chain.items()}}}
  print(json.dumps(result["heldout"]), json.dumps(result["eval_split"]))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
