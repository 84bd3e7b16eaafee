"""Train hidden-transfer heads by self-distillation (the base model stays frozen).

1. `build_store`: one teacher-forced pass of the base model over the distilled sequences keeps
   what training needs and nothing else: the layer-t residual of every token, the K/V of blocks
   t..L-1 (what the pseudo tokens attend to) and the teacher's top-`top_k` log-probs.
2. `train_heads`: examples are anchors (sequence, position n). The heads turn the anchor's
   layer-t residual into k pseudo states; `pseudo_logits` runs them through blocks t..L-1 over
   the anchor's prefix K/V, exactly as decoding does; the loss is the KL from the teacher's
   distribution at n + i (which predicts the token after n + i) to pseudo i's, averaged over
   offsets. Many epochs over the store cost only the upper blocks.
3. The heads are saved apart from the base model with their metadata (jaxspec.heads_file),
   including the measured acceptance by offset and slot that the decoder's tree is built from.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.errors import InvalidOptionError
from jaxspec.methods.hidden_transfer import KIND, init_heads, pseudo_logits
from jaxspec.models.kv_cache import KVCache, init_cache
from jaxspec.train.data import ArrayDataset
from jaxspec.train.trainer import TrainConfig, train

SLOTS = 5  # acceptance measured for the top-SLOTS tokens of each offset (top-5 accuracy = their sum)


@dataclasses.dataclass
class Store:
  tokens: np.ndarray  # [N, S] int32
  lengths: np.ndarray  # [N] int32
  h: np.ndarray  # [N, S, E] float32: residual after block layer-1
  k: np.ndarray  # [N, L-layer, K, S, D] bfloat16
  v: np.ndarray  # [N, L-layer, K, S, D] bfloat16
  top_ids: np.ndarray  # [N, S, top_k] int32: teacher's most likely next tokens
  top_logp: np.ndarray  # [N, S, top_k] float32
  layer: int

  def anchors(self, k: int) -> ArrayDataset:
    """Every (sequence, position n) whose k teacher targets n+1..n+k exist."""
    seq, pos = [], []
    for i, n in enumerate(self.lengths):
      last = int(n) - 1 - k
      if last >= 0:
        seq.append(np.full(last + 1, i, np.int32))
        pos.append(np.arange(last + 1, dtype=np.int32))
    if not seq:
      raise InvalidOptionError(f"no sequence is longer than k + 1 = {k + 1} tokens")
    return ArrayDataset({"seq": np.concatenate(seq), "pos": np.concatenate(pos)})


def sequences_from_rows(rows: list[dict], window: int) -> list[list[int]]:
  """prompt + output ids of each distilled row, the last `window` tokens of it."""
  return [(r["prompt_ids"] + r["output_ids"])[-window:] for r in rows]


def build_store(bundle, sequences: list[list[int]], layer: int, window: int = 256, top_k: int = 32,
                batch_size: int = 8, progress: bool = True) -> Store:
  """Teacher-forced pass of the frozen model over `sequences` (each at most `window` tokens)."""
  c = bundle.config
  if not 1 <= layer < c.num_layers:
    raise InvalidOptionError(f"layer must be in 1..{c.num_layers - 1}, got {layer}")
  N, S = len(sequences), window
  tokens = np.zeros((N, S), np.int32)
  lengths = np.array([len(s) for s in sequences], np.int32)
  if lengths.max() > S:
    raise InvalidOptionError(f"a sequence has {lengths.max()} tokens, more than the window {S}")
  for i, s in enumerate(sequences):
    tokens[i, :len(s)] = s
  graphdef = bundle.graphdef

  @jax.jit
  def teacher(params, empty_cache, toks_BxS):  # an argument, not built inside: XLA would constant-fold
    model = nnx.merge(graphdef, params)         # the attention over an all-zero cache (minutes of compile)
    B = toks_BxS.shape[0]
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    logits, hidden, cache = model(empty_cache, toks_BxS, pos, None, capture=(layer - 1,))
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, top_k)
    kv = lambda xs: jnp.stack(xs[layer:], axis=1).astype(jnp.bfloat16)  # [B, L-layer, K, S, D]
    return hidden[layer - 1].astype(jnp.float32), kv(cache.k), kv(cache.v), top_ids.astype(jnp.int32), top_logp

  empty = init_cache(c, batch_size, S, bundle.dtype)
  parts = []
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=N, desc=f"teacher pass (layer {layer})", dynamic_ncols=True)
  for s in range(0, N, batch_size):
    chunk = tokens[s:s + batch_size]
    pad = batch_size - len(chunk)
    out = teacher(bundle.params, empty, jnp.asarray(np.pad(chunk, ((0, pad), (0, 0)))))
    parts.append([np.asarray(x)[:len(chunk)] for x in out])
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  h, k, v, ids, logp = (np.concatenate(xs) for xs in zip(*parts))
  return Store(tokens, lengths, h, k, v, ids, logp, layer)


def head_logits(model, heads, store_arrays, batch, layer: int):
  """Pseudo logits [B, k, V] of a batch of anchors, through the decoding path (`pseudo_logits`)."""
  seq, n = batch["seq"], batch["pos"]
  L = model.config.num_layers
  k_up = store_arrays["k"][seq].astype(jnp.float32)  # [B, L-layer, K, S, D]
  v_up = store_arrays["v"][seq].astype(jnp.float32)
  ks = (None,) * layer + tuple(k_up[:, j] for j in range(L - layer))
  vs = (None,) * layer + tuple(v_up[:, j] for j in range(L - layer))
  cache = KVCache(k=ks, v=vs, lengths=n + 1)
  pending = store_arrays["tokens"][seq, n + 1]  # the token after the anchor (the tree's root when decoding)
  return pseudo_logits(model, heads, cache, store_arrays["h"][seq, n], layer, pending_B=pending)


def kl_loss(graphdef, layer: int):
  """loss(heads, frozen, batch) for the trainer: KL(teacher || pseudo) averaged over anchors
  and offsets; metrics: top-1 agreement with the teacher per offset."""

  def loss(heads, frozen, batch):
    model = nnx.merge(graphdef, frozen["params"])
    logits = head_logits(model, heads, frozen["store"], batch, layer)  # [B, k, V]
    K = logits.shape[1]
    at = batch["pos"][:, None] + 1 + jnp.arange(K)[None, :]  # teacher positions n+1..n+k
    ids = frozen["store"]["top_ids"][batch["seq"][:, None], at]  # [B, k, top]
    t_logp = frozen["store"]["top_logp"][batch["seq"][:, None], at]
    p = jax.nn.softmax(t_logp, axis=-1)  # the teacher renormalised over its top tokens
    log_q = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids, axis=-1)
    kl_BxK = jnp.sum(p * (jnp.log(p + 1e-20) - log_q), axis=-1)
    agree = jnp.argmax(logits, axis=-1) == ids[..., 0]
    metrics = {f"top1_o{i + 1}": jnp.mean(agree[:, i]) for i in range(K)}
    return jnp.mean(kl_BxK), metrics

  return loss


def acceptance_by_offset_slot(bundle, heads, store: Store, data: ArrayDataset, batch_size: int = 64,
                              max_batches: int = 32) -> np.ndarray:
  """[k, SLOTS]: how often the teacher's argmax is the heads' c-th most likely token at offset i
  (greedy acceptance of a tree node at depth i + 1, slot c, given its parent was accepted)."""
  graphdef, layer = bundle.graphdef, store.layer
  arrays = _store_arrays(store)

  @jax.jit
  def ranks(params, heads, arrays, batch):
    model = nnx.merge(graphdef, params)
    logits = head_logits(model, heads, arrays, batch, layer)
    K = logits.shape[1]
    at = batch["pos"][:, None] + 1 + jnp.arange(K)[None, :]
    target = arrays["top_ids"][batch["seq"][:, None], at][..., 0]  # [B, k]
    top = jax.lax.top_k(logits, SLOTS)[1]  # [B, k, SLOTS]
    return jnp.sum(top == target[..., None], axis=0)  # [k, SLOTS] counts

  counts, total = 0, 0
  for b, _ in zip(data.batches(batch_size), range(max_batches)):
    counts = counts + np.asarray(ranks(bundle.params, heads, arrays, b))
    total += len(b["seq"])
  return counts / max(total, 1)


def _store_arrays(store: Store) -> dict:
  return {"tokens": jnp.asarray(store.tokens), "h": jnp.asarray(store.h), "k": jnp.asarray(store.k),
          "v": jnp.asarray(store.v), "top_ids": jnp.asarray(store.top_ids), "top_logp": jnp.asarray(store.top_logp)}


def draft_vocabulary(sequences, vocab_size: int, size: int = 8192) -> np.ndarray:
  """[size] int32 token ids the heads rank their drafts over (FR-Spec's frequency-ranked draft
  vocabulary): the tokens of `sequences` (the base model's own continuations) most frequent
  first, then the lowest ids not yet taken (a BPE vocabulary's earliest merges, its commonest
  pieces). A draft outside it is never proposed; the output is still the verifier's."""
  if not 8 <= size <= vocab_size:
    raise ValueError(f"draft vocabulary size must be in [8, {vocab_size}], got {size}")
  counts = np.zeros(vocab_size, np.int64)
  for seq in sequences:
    counts += np.bincount(np.asarray(seq, np.int64), minlength=vocab_size)[:vocab_size]
  seen = np.nonzero(counts)[0]
  by_count = seen[np.argsort(-counts[seen], kind="stable")]
  rest = np.setdiff1d(np.arange(vocab_size), by_count)  # ascending ids
  return np.concatenate([by_count, rest])[:size].astype(np.int32)


def train_heads(bundle, store: Store, k: int, cfg: TrainConfig, workdir: str | Path, *, eval_fraction: float = 0.08,
                data_manifest: dict | None = None, progress: bool = True, stop_after: int | None = None,
                seq_groups=None, token_input: bool = False):
  """Train k heads on `store`; returns (heads, log, meta) with meta ready for save_params_file.
  `seq_groups`: one label per stored sequence (its prompt): the eval split holds out whole groups.
  `token_input`: heads that also read the pending token (`pseudo_states`)."""
  from jaxspec.heads_file import model_fingerprint
  from jaxspec.train.data import held_out_groups
  anchors = store.anchors(k)
  # eval on whole held-out sequences: neighbouring anchors of one sequence are nearly the same example
  if seq_groups is not None:
    eval_seqs = np.nonzero(held_out_groups(seq_groups, eval_fraction, cfg.seed))[0]
  else:
    n_eval = max(1, int(round(len(store.lengths) * eval_fraction)))
    eval_seqs = np.random.default_rng([cfg.seed, 7]).permutation(len(store.lengths))[:n_eval]
  is_eval = np.isin(anchors.arrays["seq"], eval_seqs)
  train_set = ArrayDataset({n: v[~is_eval] for n, v in anchors.arrays.items()})
  mix = np.random.default_rng([cfg.seed, 8]).permutation(int(is_eval.sum()))  # eval batches: a random sample
  eval_set = ArrayDataset({n: v[is_eval][mix] for n, v in anchors.arrays.items()})
  heads = init_heads(jax.random.key(cfg.seed), k, bundle.config.embed_dim, token_input=token_input)
  frozen = {"params": bundle.params, "store": _store_arrays(store)}
  run_info = {"kind": KIND, "layer": store.layer, "k": k, "token_input": token_input,
              "base": model_fingerprint(bundle), "anchors": len(anchors), "data": data_manifest or {}}
  t0 = time.perf_counter()
  heads, log = train(kl_loss(bundle.graphdef, store.layer), heads, frozen, train_set, cfg, workdir,
                     eval_data=eval_set, run_info=run_info, progress=progress, stop_after=stop_after)
  accept = acceptance_by_offset_slot(bundle, heads, store, eval_set)
  last_eval = next((r for r in reversed(log) if "eval_loss" in r), {})
  meta = {"kind": KIND, "base_model": bundle.name, "base_fingerprint": model_fingerprint(bundle),
          "layer": store.layer, "k": k, "token_input": token_input, "embed_dim": bundle.config.embed_dim,
          "vocab_size": bundle.config.vocab_size, "data": data_manifest or {},
          "train": {**dataclasses.asdict(cfg), "anchors": len(train_set), "eval_anchors": len(eval_set),
                    "seconds": time.perf_counter() - t0},
          "eval": {"kl": last_eval.get("eval_loss"),
                   "top1_by_offset": [float(a) for a in accept[:, 0]],
                   "accept_by_offset_slot": [[float(x) for x in row] for row in accept]}}
  return heads, log, meta


def load_or_build_store(bundle, rows: list[dict], layer: int, window: int, top_k: int, folder: str | Path,
                        progress: bool = True) -> Store:
  """The teacher store for these rows, kept in `folder/store-layer{layer}-KEY` (one .npy per array,
  written to a temporary folder and renamed: an interrupted build is rebuilt, never half-read)."""
  import hashlib
  import json
  import os
  import shutil
  from jaxspec.heads_file import model_fingerprint
  key = hashlib.sha256(json.dumps([model_fingerprint(bundle), layer, window, top_k,
                                   [(r["question_id"], len(r["output_ids"])) for r in rows]]).encode()).hexdigest()[:12]
  if len({str(r["question_id"]) for r in rows}) < len(rows):  # several continuations per prompt: key their tokens
    key = hashlib.sha256((key + json.dumps([r["output_ids"] for r in rows])).encode()).hexdigest()[:12]
  folder = Path(folder) / f"store-layer{layer}-{key}"
  names = [f.name for f in dataclasses.fields(Store) if f.name != "layer"]
  if folder.is_dir():  # .npy has no bfloat16: those arrays come back as 2-byte voids
    load = lambda n: (lambda a: a.view(jnp.bfloat16) if a.dtype.kind == "V" else a)(np.load(folder / f"{n}.npy"))
    return Store(**{n: load(n) for n in names}, layer=layer)
  store = build_store(bundle, sequences_from_rows(rows, window), layer, window, top_k, progress=progress)
  tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
  tmp.mkdir(parents=True, exist_ok=True)
  for n in names:
    np.save(tmp / f"{n}.npy", getattr(store, n))
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(tmp, folder)
  return store
