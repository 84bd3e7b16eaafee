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
from jaxspec.models.decoder import Decoder, rms_norm
from jaxspec.models.kv_cache import init_cache
from jaxspec.models.rope import apply_rope, rope_cos_sin

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


def train_logits(model: Decoder, tokens_BxT):
  """The Decoder's causal forward without a KV cache (the decode forward writes one, which
  makes the backward pass several times slower). Same math: checked by `check_train_forward`."""
  c = model.config
  B, T = tokens_BxT.shape
  H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
  cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), D, c.rope_theta)
  causal_TxT = jnp.tril(jnp.ones((T, T), bool))
  x = model.embed_VxE[...][tokens_BxT]
  for blk in model.blocks:
    a = blk.attn
    h = rms_norm(x, blk.attn_norm_E[...], c.rms_norm_eps)
    q_BxTxHxD = apply_rope((h @ a.q_ExHD[...]).reshape(B, T, H, D), cos, sin)
    k_BxTxHxD = jnp.repeat(apply_rope((h @ a.k_ExKD[...]).reshape(B, T, K, D), cos, sin), H // K, axis=2)
    v_BxTxHxD = jnp.repeat((h @ a.v_ExKD[...]).reshape(B, T, K, D), H // K, axis=2)
    s_BxHxTxT = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxTxHxD) * D**-0.5
    p_BxHxTxT = jax.nn.softmax(jnp.where(causal_TxT, s_BxHxTxT, -1e30), axis=-1)
    o_BxTxHxD = jnp.einsum("bhts,bshd->bthd", p_BxHxTxT, v_BxTxHxD)
    x = x + o_BxTxHxD.reshape(B, T, H * D) @ a.o_HDxE[...]
    x = x + blk.mlp(rms_norm(x, blk.mlp_norm_E[...], c.rms_norm_eps))
  return model.logits(rms_norm(x, model.final_norm_E[...], c.rms_norm_eps))


def check_train_forward(graphdef, params, tokens_BxT):
  """The training forward must equal the decode forward (the one generate() uses)."""
  model = nnx.merge(graphdef, params)
  B, T = tokens_BxT.shape
  ref, _, _ = model(init_cache(CONFIG, B, T, jnp.float32), tokens_BxT,
                    jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), jnp.tril(jnp.ones((T, T), bool)))
  np.testing.assert_allclose(np.asarray(train_logits(model, tokens_BxT)), np.asarray(ref), atol=2e-4, rtol=2e-4)


def loss_fn(params, graphdef, tokens_BxL):
  logits = train_logits(nnx.merge(graphdef, params), tokens_BxL[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:]).mean()


def train(ckpt_dir: Path, steps: int, minutes: float, batch_size: int = 16, ckpt_every: int = 50, seed: int = 0):
  """Train (or resume) and return (bundle, info dict)."""
  model = Decoder(CONFIG, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  opt = make_optimizer(steps)
  opt_state = opt.init(params)
  check_train_forward(graphdef, params, jnp.asarray(data.batch(np.random.default_rng(12345), 2)))
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
