"""The training loop: optax optimizer, one jitted step, orbax checkpoints with resume, eval
split, progress bar, JSON log and a training-curve PNG.

Guarantees:
* Resume: `train` in a workdir holding checkpoints continues from the latest one (trainable
  params, optimizer state, step; batches are a function of the step) and reproduces the loss
  curve of an uninterrupted run. Checkpoints are written atomically by orbax (a killed run
  leaves the previous one intact); the last `keep` are kept.
* Placement: the optimizer state lives on the trainable's mesh (moments sharded like it);
  a checkpoint restores onto the shardings of the trainable passed in, so a run checkpointed on
  one mesh resumes on another.
* A workdir written by a different run (another config or trainable shape) is refused with a
  one-line error instead of being mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxspec.errors import InvalidOptionError
from jaxspec.train.data import ArrayDataset

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 16
  lr: float = 1e-3
  warmup_steps: int = 50
  end_lr_fraction: float = 0.1  # cosine decays to lr * this
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  eval_every: int = 200
  eval_batches: int = 8
  save_every: int = 200
  keep: int = 2
  log_every: int = 10
  seed: int = 0

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.save_every < 1 or self.keep < 1:
      raise InvalidOptionError(f"bad training config {self}: steps, batch_size, save_every, keep >= 1 and lr > 0")


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to cfg.lr, then cosine decay to lr * end_lr_fraction at cfg.steps."""
  warmup = max(1, min(cfg.warmup_steps, cfg.steps - 1))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                            end_value=cfg.lr * cfg.end_lr_fraction)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW on the warmup + cosine schedule, after global-norm clipping."""
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))


def _fingerprint(cfg: TrainConfig, trainable, extra: dict) -> str:
  shapes = [(str(p), tuple(x.shape), str(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(trainable)]
  run = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("eval_every", "eval_batches", "log_every")}
  text = json.dumps({"config": run, "shapes": shapes, "extra": extra}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Checkpoints:
  """orbax CheckpointManager over {params, opt_state} + JSON metadata, atomic and pruned."""

  def __init__(self, directory: Path, keep: int):
    self.mgr = ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep),
                                     item_names=("state", "meta"))

  def latest(self) -> int | None:
    return self.mgr.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def meta(self, step: int) -> dict:
    return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state):
    out = self.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                         meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


def _on_devices_of(trainable, state):
  """`state` with every leaf that is not on the trainable's mesh (the optimizer's step count, a
  scalar optax puts on the default device) replicated over it; a no-op off a mesh."""
  meshes = {x.sharding.mesh for x in jax.tree.leaves(trainable) if isinstance(x.sharding, NamedSharding)}
  if not meshes:
    return state
  if len(meshes) > 1:
    raise InvalidOptionError("the trainable arrays are placed on more than one mesh")
  replicated = NamedSharding(meshes.pop(), PartitionSpec())
  on_mesh = lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated)
  return jax.tree.map(on_mesh, state)


def _mean_metrics(rows: list[dict]) -> dict:
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def train(loss_fn: LossFn, trainable, frozen, data: ArrayDataset, cfg: TrainConfig, workdir: str | Path, *,
          eval_data: ArrayDataset | None = None, run_info: dict | None = None, progress: bool = True,
          stop_after: int | None = None, tokens_key: str | None = None) -> tuple[Any, list[dict]]:
  """Train `trainable` (a pytree of arrays) to minimise `loss_fn(trainable, frozen, batch)`.

  Writes into `workdir`: checkpoints/ (orbax), log.json (one record per logged step and eval),
  curve.png (when matplotlib is installed). `run_info` (data manifest, base model hash, ...) is
  part of the run's identity: a workdir from another run is refused. `stop_after` ends the run
  early at that step after checkpointing it (tests use it to simulate an interruption).
  `tokens_key`: batch entry whose size counts as tokens for the tokens/s figure.
  Returns (trainable, log records).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  fingerprint = _fingerprint(cfg, trainable, run_info or {})
  opt, schedule = make_optimizer(cfg), make_schedule(cfg)
  state = _on_devices_of(trainable, {"params": trainable, "opt_state": opt.init(trainable)})
  ckpts = _Checkpoints(workdir / "checkpoints", cfg.keep)
  log_path = workdir / "log.json"
  log: list[dict] = []
  window: list[dict] = []  # metrics of the steps since the last log record
  start = 0
  latest = ckpts.latest()
  if latest is not None:
    seen = ckpts.meta(latest).get("fingerprint")
    if seen != fingerprint:
      ckpts.close()
      raise InvalidOptionError(f"{workdir} holds checkpoints of a different run (fingerprint {seen}, this run "
                               f"{fingerprint}: other settings, data or shapes); use another workdir or delete it")
    state, meta = ckpts.restore(latest, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    start = int(meta["step"])
    window = meta.get("window", [])  # metrics of steps not yet logged
    if log_path.exists():
      log = [r for r in json.loads(log_path.read_text()) if r["step"] <= start]

  @jax.jit  # frozen is an argument, not a closure: large frozen arrays must not become constants
  def step_fn(state, frozen, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch)
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

  @jax.jit
  def eval_fn(params, frozen, batch):
    loss, metrics = loss_fn(params, frozen, batch)
    return dict(metrics, loss=loss)

  def evaluate(params) -> dict:
    rows = [jax.device_get(eval_fn(params, frozen, b))
            for b, _ in zip(eval_data.batches(cfg.batch_size), range(cfg.eval_batches))]
    return _mean_metrics(rows)

  def save(step: int) -> None:
    ckpts.save(step, state, {"step": step, "fingerprint": fingerprint, "config": dataclasses.asdict(cfg),
                             "run_info": run_info or {},
                             "window": window})
    ckpts.mgr.wait_until_finished()
    tmp = log_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(log, indent=1))
    tmp.replace(log_path)

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
  t_last, tokens_since = time.perf_counter(), 0
  end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
  try:
    for step in range(start, end):
      batch = data.batch(step, cfg.batch_size, cfg.seed)
      state, metrics = step_fn(state, frozen, batch)
      window.append({k: float(v) for k, v in jax.device_get(metrics).items()})
      tokens_since += int(np.asarray(batch[tokens_key]).size) if tokens_key else cfg.batch_size
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        dt = time.perf_counter() - t_last
        rec = {"step": done, **_mean_metrics(window), "lr": float(schedule(step)),
               ("tokens_per_s" if tokens_key else "examples_per_s"): tokens_since / dt if dt > 0 else 0.0}
        log.append(rec)
        window, t_last, tokens_since = [], time.perf_counter(), 0
        if bar is not None:
          bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k != "step"}, refresh=False)
      if eval_data is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
        log.append({"step": done, **{f"eval_{k}": v for k, v in evaluate(state["params"]).items()}})
      if done % cfg.save_every == 0 or done == end:
        save(done)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
    ckpts.close()
  if end == cfg.steps:
    plot_log(log, workdir / "curve.png")
  return state["params"], log


def plot_log(log: list[dict], path: Path) -> bool:
  """Training and eval loss (and per-key metrics) against step; False when matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  train_rows = [r for r in log if "loss" in r]
  eval_rows = [r for r in log if "eval_loss" in r]
  metrics = sorted({k for r in train_rows for k in r if k.startswith("top1_")})
  fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(11 if metrics else 6, 4), squeeze=False)
  ax = axes[0][0]
  ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
  if eval_rows:
    ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval")
  ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend()
  if metrics:
    ax = axes[0][1]
    for k in metrics:
      rows = [r for r in eval_rows if f"eval_{k}" in r] or train_rows
      key = f"eval_{k}" if rows is not train_rows else k
      ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step"), ax.set_ylabel("top-1 agreement"), ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True
