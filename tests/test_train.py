"""The training subsystem on a tiny problem (seconds): the loss falls, an interrupted run
resumed from its checkpoint reproduces the uninterrupted one, another run's workdir is refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import InvalidOptionError
from jaxspec.train import ArrayDataset, TrainConfig, train


def _problem(n=256, d=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, 3)).astype(np.float32)
  return ArrayDataset({"x": x, "y": (x @ w + 0.01 * rng.normal(size=(n, 3))).astype(np.float32)})


def _loss(params, frozen, batch):
  pred = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"] * frozen["scale"]
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, {"top1_sign": jnp.mean(jnp.sign(pred) == jnp.sign(batch["y"]))}


def _init(d=8):
  k1, k2 = jax.random.split(jax.random.key(1))
  return {"w1": 0.3 * jax.random.normal(k1, (d, 16)), "w2": 0.3 * jax.random.normal(k2, (16, 3))}


CFG = TrainConfig(steps=60, batch_size=16, lr=3e-2, warmup_steps=5, save_every=20, eval_every=20, log_every=5)


def test_loss_falls_and_outputs_are_written(tmp_path):
  data, ev = _problem().split(0.25)
  params, log = train(_loss, _init(), {"scale": 1.0}, data, CFG, tmp_path, eval_data=ev, progress=False)
  losses = [r["loss"] for r in log if "loss" in r]
  assert losses[-1] < 0.5 * losses[0]
  evals = [r for r in log if "eval_loss" in r]
  assert [r["step"] for r in evals] == [20, 40, 60] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert json.loads((tmp_path / "log.json").read_text()) == log
  assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["40", "60"]  # keep=2


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
  data = _problem()
  full, full_log = train(_loss, _init(), {"scale": 1.0}, data, CFG, tmp_path / "a", progress=False)
  train(_loss, _init(), {"scale": 1.0}, data, CFG, tmp_path / "b", progress=False, stop_after=33)  # "killed"
  assert json.loads((tmp_path / "b" / "log.json").read_text())[-1]["step"] == 30
  resumed, resumed_log = train(_loss, _init(), {"scale": 1.0}, data, CFG, tmp_path / "b", progress=False)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda log: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in log]
  assert strip(resumed_log) == strip(full_log)


def test_a_workdir_from_another_run_is_refused(tmp_path):
  data = _problem()
  train(_loss, _init(), {"scale": 1.0}, data, CFG, tmp_path, progress=False, stop_after=20)
  other = TrainConfig(**{**CFG.__dict__, "lr": 1e-2})
  with pytest.raises(InvalidOptionError, match="different run"):
    train(_loss, _init(), {"scale": 1.0}, data, other, tmp_path, progress=False)
  with pytest.raises(InvalidOptionError, match="different run"):
    train(_loss, _init(), {"scale": 1.0}, data, CFG, tmp_path, progress=False, run_info={"data": "other"})


def test_batches_are_a_function_of_the_step():
  data = _problem(n=10)
  a = [data.batch(s, 4)["x"] for s in range(6)]
  b = [data.batch(s, 4)["x"] for s in (3, 4, 5)]
  for x, y in zip(a[3:], b):
    np.testing.assert_array_equal(x, y)
  seen = np.concatenate([data.batch(s, 5)["x"] for s in (0, 1)])  # one epoch covers every row once
  assert len({tuple(r) for r in seen}) == 10
