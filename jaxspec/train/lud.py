"""Fine-tune a model for Lexical Unit Decoding (the LUD method, jaxspec.methods.lud).

1. Mine units with the base model (`lud_units`): teacher-forced over the self-distilled
   sequences (prompt + the model's own continuation).
2. Reconfigure each sequence (`lud_data`): placeholder copies of its units after it, with
   per-example masks and position ids; one forward of the training contract per batch.
3. Loss = AR cross-entropy on the real tokens + `ph_weight` x cross-entropy of the
   placeholders on the unit tokens they stand before. Two modes, one loss:
   * "lora": low-rank adapters on every projection + the placeholder's embedding row
     (jaxspec.train.lora), the base frozen; the result is a small params file;
   * "full": every weight trained; the result is a whole model folder.
4. The result is saved apart from the base model with its metadata (kind, base fingerprint,
   placeholder id, k, mining alpha, data manifest, eval figures), or exported as a Hugging
   Face folder that `jaxspec.load_model` and transformers read (`export_folder`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.errors import InvalidOptionError
from jaxspec.train import lora
from jaxspec.train.data import ArrayDataset
from jaxspec.train.lud_data import reconfigure_all
from jaxspec.train.lud_units import mine_units, token_confidence
from jaxspec.train.trainer import TrainConfig, train

KIND = "lud_adapters"
LUD_META = "jaxspec_lud.json"  # in an exported model folder: placeholder id, k, training summary
PLACEHOLDER = {"smollm2-135m-instruct": 16}  # "<empty_output>": a special token chat never uses
MODES = ("lora", "full")


@dataclasses.dataclass(frozen=True)
class LudConfig:
  k: int = 4  # longest unit (tokens one step can commit)
  alpha: float = 0.8  # mining threshold
  mode: str = "lora"
  rank: int = 8
  lora_scale: float = 2.0  # the adapter update is scale * A @ B
  ph_weight: float = 1.0
  window: int = 288  # the last tokens of each sequence
  budget: int = 96  # placeholder slots per example
  placeholder_id: int = -1  # -1: PLACEHOLDER[model] or the model's last vocabulary id

  def __post_init__(self):
    if self.mode not in MODES:
      raise InvalidOptionError(f"LUD training mode must be one of {MODES}, got {self.mode!r}")
    if self.k < 2 or not 0 <= self.alpha < 1 or self.rank < 1 or self.budget < 1:
      raise InvalidOptionError(f"bad LUD config {self}: k >= 2, 0 <= alpha < 1, rank >= 1, budget >= 1")


def placeholder_for(bundle, cfg: LudConfig) -> int:
  ph = cfg.placeholder_id if cfg.placeholder_id >= 0 else PLACEHOLDER.get(bundle.name, bundle.config.vocab_size - 1)
  if not 0 <= ph < bundle.config.vocab_size:
    raise InvalidOptionError(f"placeholder id {ph} is outside the vocabulary (0..{bundle.config.vocab_size - 1})")
  return ph


def canonical(bundle):
  """(graphdef, params) of the bundle's model without the CPU layout's transposed copies."""
  from jaxspec.models.cpu_layout import strip_transposed_weights
  from jaxspec.models.decoder import Decoder
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(bundle.config, dtype=bundle.dtype, rngs=nnx.Rngs(0))))
  return graphdef, strip_transposed_weights(bundle.params)


def lud_loss(graphdef, treedef, names: list[str], mode: str, scale: float, ph_weight: float):
  """loss(trainable, frozen, batch) for the trainer; metrics: AR and placeholder losses and top-1."""

  def params_of(trainable, frozen):
    if mode == "full":
      return jax.tree_util.tree_unflatten(treedef, [trainable[n] for n in names])
    return lora.merge(jax.tree_util.tree_unflatten(treedef, frozen), trainable, scale)

  def loss(trainable, frozen, batch):
    model = nnx.merge(graphdef, params_of(trainable, frozen))
    logits, _, _ = model(None, batch["tokens"], batch["positions"], batch["mask"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    w, ph = batch["weight"], batch["is_placeholder"]
    w_ar, w_ph = w * ~ph, w * ph
    mean = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
    ar, unit = mean(nll, w_ar), mean(nll, w_ph)
    return ar + ph_weight * unit, {"ar_loss": ar, "unit_loss": unit, "top1_ar": mean(hit, w_ar),
                                   "top1_unit": mean(hit, w_ph)}

  return loss


def corpus(rows: list[dict], window: int) -> tuple[list[list[int]], list[str]]:
  """(the last `window` tokens of prompt + continuation, category) of each distilled row."""
  return [(r["prompt_ids"] + r["output_ids"])[-window:] for r in rows], [r.get("category", "") for r in rows]


def build_dataset(bundle, sequences, cfg: LudConfig, seed: int = 0, progress: bool = True):
  """(examples as arrays, units per sequence, token confidence) for these sequences."""
  conf = token_confidence(bundle, sequences, progress=progress)
  units = [mine_units(p, am, cfg.alpha, cfg.k) for p, am in conf]
  arrays = reconfigure_all(sequences, units, cfg.k, placeholder_for(bundle, cfg), cfg.window, cfg.budget, seed)
  return arrays, units, conf


def train_lud(bundle, rows: list[dict], cfg: LudConfig, tcfg: TrainConfig, workdir: str | Path, *,
              eval_fraction: float = 0.08, data_manifest: dict | None = None, progress: bool = True,
              stop_after: int | None = None):
  """Fine-tune on distilled rows; returns (trained, log, meta): trained = adapters (lora) or the
  full flat params (full), meta ready for `save_params_file` / `export_folder`."""
  from jaxspec.heads_file import model_fingerprint
  sequences, _ = corpus(rows, cfg.window)
  arrays, units, _ = build_dataset(bundle, sequences, cfg, tcfg.seed, progress)
  # several continuations of one prompt (greedy + sampled) stay on one side of the split
  groups = [str(r["question_id"]) for r in rows]
  train_set, eval_set = ArrayDataset(arrays).split(eval_fraction, tcfg.seed,
                                                   groups if len(set(groups)) < len(groups) else None)
  graphdef, params = canonical(bundle)
  names, leaves, treedef = lora.named_leaves(params)
  ph = placeholder_for(bundle, cfg)
  if cfg.mode == "lora":
    trainable = lora.init_lora(jax.random.key(tcfg.seed), params, cfg.rank)
    embed = dict(zip(names, leaves))[lora.EMBED]
    trainable[f"rows.{ph}"] = jnp.asarray(embed[ph], jnp.float32)
    frozen = leaves
  else:
    trainable, frozen = dict(zip(names, leaves)), ()
  run_info = {"kind": KIND, "lud": dataclasses.asdict(cfg), "base": model_fingerprint(bundle),
              "examples": len(train_set), "data": data_manifest or {}}
  loss_fn = lud_loss(graphdef, treedef, names, cfg.mode, cfg.lora_scale, cfg.ph_weight)
  t0 = time.perf_counter()
  trained, log = train(loss_fn, trainable, frozen, train_set, tcfg, workdir, eval_data=eval_set,
                       run_info=run_info, progress=progress, stop_after=stop_after, tokens_key="tokens")
  last_eval = next((r for r in reversed(log) if "eval_loss" in r), {})
  multi = sum(l for u in units for _, l in u if l > 1) / max(sum(l for u in units for _, l in u), 1)
  meta = {"kind": KIND, "mode": cfg.mode, "base_model": bundle.name, "base_fingerprint": model_fingerprint(bundle),
          "placeholder_id": ph, "k": cfg.k, "alpha": cfg.alpha, "rank": cfg.rank, "lora_scale": cfg.lora_scale,
          "embed_dim": bundle.config.embed_dim, "vocab_size": bundle.config.vocab_size, "data": data_manifest or {},
          "train": {**dataclasses.asdict(tcfg), "examples": len(train_set), "eval_examples": len(eval_set),
                    "share_in_multi_token_units": multi, "seconds": time.perf_counter() - t0},
          "eval": {k: v for k, v in last_eval.items() if k != "step"}}
  return trained, log, meta


def merged_params(bundle, adapters: dict, meta: dict):
  """The bundle's params (its own layout, CPU copies included) with the adapters merged."""
  return jax.jit(lambda p, a: lora.merge(p, a, float(meta["lora_scale"])))(
      bundle.params, {n: jnp.asarray(v) for n, v in adapters.items()})


def export_folder(bundle, params, meta: dict, out: str | Path) -> Path:
  """A Hugging Face model folder (config.json, model.safetensors, tokenizer files) of `params`
  (canonical layout, e.g. `merged_params` stripped, or a full fine-tune) plus LUD_META: the
  fine-tuned model as a normal model. Written to a temporary folder and renamed."""
  import os
  from safetensors.numpy import save_file
  from jaxspec.models.cpu_layout import strip_transposed_weights
  from jaxspec.models.hf_loader import hf_tensor_names
  out = Path(out)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  hf = hf_tensor_names(bundle.config)
  tensors = {}
  for path, var in nnx.to_flat_state(strip_transposed_weights(params)):
    name, transpose = hf[tuple(path)]
    arr = np.asarray(jax.device_get(var[...] if hasattr(var, "__getitem__") else var), np.float32)
    tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
  save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  os.chmod(tmp / "model.safetensors", 0o644)
  src = Path(bundle.path)
  for f in src.iterdir():
    if (f.is_file() and f.suffix in (".json", ".txt", ".model") and not f.name.startswith(".")
        and f.name not in ("model.safetensors.index.json", "jaxspec_source.json", LUD_META)):
      shutil.copy(f, tmp / f.name)
  (tmp / LUD_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out
