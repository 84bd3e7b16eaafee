"""Train a small jaxspec Decoder on the procedural image-token sequences (optax, CPU).

Orbax checkpoints (params, optimizer state, step) every `--ckpt-every` steps; a rerun resumes
from the latest one and stops at `--steps` or when `--minutes` of training time are spent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import data
from jaxspec.models.bundle import ModelBundle
from jaxspec.models.config import ModelConfig
from jaxspec.models.decoder import Decoder

SEQ = 1 + data.SIZE * data.SIZE
CONFIG = ModelConfig(vocab_size=data.VOCAB, embed_dim=96, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24,
                     mlp_dim=288, rope_theta=10000.0, max_position_embeddings=512, eos_token_ids=(),
                     model_type="llama")


class GridTokenizer:
  """Decodes ids as space-separated numbers (no text: these are pixels)."""

  eos_token_id = None
  chat_template = None

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(str(int(i)) for i in ids)

  def encode(self, text, add_special_tokens=True):
    return [int(t) for t in text.split()]


def make_optimizer(total_steps: int):
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(100, total_steps // 10), total_steps, 1e-4)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))


def loss_fn(params, graphdef, tokens_BxL):
  """Next-token cross-entropy through the decoder's own cache-free forward (the one generate()
  runs, with cache=None: plain causal attention, differentiable)."""
  inputs_BxT = tokens_BxL[:, :-1]
  B, T = inputs_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  logits, _, _ = nnx.merge(graphdef, params)(None, inputs_BxT, positions_BxT)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:]).mean()


def train(ckpt_dir: Path, steps: int, minutes: float, batch_size: int = 16, ckpt_every: int = 50, seed: int = 0):
  """Train (or resume) and return (bundle, info dict)."""
  model = Decoder(CONFIG, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  opt = make_optimizer(steps)
  opt_state = opt.init(params)
  mngr = ocp.CheckpointManager(ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2))
  start = 0
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, dict(params=params, opt_state=opt_state))
    restored = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
    params, opt_state = restored["params"], restored["opt_state"]

  @jax.jit
  def step_fn(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, tokens)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0, losses, step = time.perf_counter(), [], start
  bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step")
  for step in bar:
    tokens = jnp.asarray(data.batch(np.random.default_rng(seed * 100003 + step), batch_size))
    params, opt_state, loss = step_fn(params, opt_state, tokens)
    losses.append(float(loss))
    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    done = step + 1
    if done % ckpt_every == 0 or done == steps or time.perf_counter() - t0 > 60 * minutes:
      mngr.save(done, args=ocp.args.StandardSave(dict(params=params, opt_state=opt_state)))
    if time.perf_counter() - t0 > 60 * minutes:
      step = done
      break
  else:
    step = steps
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  bundle = ModelBundle("image-tokens", None, CONFIG, graphdef, params, GridTokenizer(), jnp.dtype(jnp.float32))
  return bundle, dict(resumed_from=start, trained_to=int(step), target_steps=steps,
                      train_s=time.perf_counter() - t0, final_loss=float(np.mean(losses[-20:])) if losses else None)


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--ckpt-dir", type=Path, default=Path.home() / ".cache" / "jaxspec" / "image_tokens_ckpt")
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--minutes", type=float, default=5.0)
  args = ap.parse_args()
  print(train(args.ckpt_dir, args.steps, args.minutes)[1])
