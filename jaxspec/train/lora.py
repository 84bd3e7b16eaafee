"""Low-rank adapters (LoRA) on the decoder's projection weights, plus trained embedding rows.

An adapter set is a flat dict of arrays (what a params file stores):
  "<path>.A": [in, r], "<path>.B": [r, out]  for a projection weight at <path> (e.g.
  "blocks.3.attn.q_ExHD"): the weight becomes W + scale * A @ B;
  "rows.<token id>": [E]: that row of the embedding (tied models: of the LM head too) replaced.

`merge` applies a set to the model's params, differentiably (training runs the merged
weights) and once at load (decoding then costs nothing extra). The CPU layout's `[out, in]`
copies (`<name>_T`, jaxspec.models.cpu_layout) are merged too, so they stay the transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import InvalidOptionError

PROJECTIONS = ("q_ExHD", "k_ExKD", "v_ExKD", "o_HDxE", "gate_ExF", "up_ExF", "down_FxE")
EMBED = "embed_VxE"


def param_name(path) -> str:
  """"blocks.3.attn.q_ExHD" for a params pytree path (nnx.State or plain dicts)."""
  parts = []
  for p in path:
    key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", None)))
    if key == "value":
      continue
    parts.append(str(key))
  return ".".join(parts)


def named_leaves(params) -> tuple[list[str], list, object]:
  """(names, leaves, treedef) of a params pytree, in its flattening order."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [param_name(p) for p, _ in with_path], [x for _, x in with_path], treedef


def init_lora(key, params, rank: int, targets: tuple[str, ...] = PROJECTIONS) -> dict[str, jax.Array]:
  """A: N(0, 1/in), B: 0 (the merged model starts as the base model exactly)."""
  if rank < 1:
    raise InvalidOptionError(f"LoRA rank must be >= 1, got {rank}")
  names, leaves, _ = named_leaves(params)
  out = {}
  for name, w in zip(names, leaves):
    if name.rsplit(".", 1)[-1] in targets:
      key, sub = jax.random.split(key)
      d_in, d_out = w.shape
      out[name + ".A"] = jax.random.normal(sub, (d_in, rank), jnp.float32) / np.sqrt(d_in)
      out[name + ".B"] = jnp.zeros((rank, d_out), jnp.float32)
  if not out:
    raise InvalidOptionError(f"no weight matches the LoRA targets {targets}")
  return out


def merge(params, adapters: dict, scale: float):
  """params with every adapter applied (same pytree structure and dtypes)."""
  names, leaves, treedef = named_leaves(params)
  rows = {int(k.split(".", 1)[1]): v for k, v in adapters.items() if k.startswith("rows.")}
  new = []
  for name, w in zip(names, leaves):
    base = name[:-2] if name.endswith("_T") else name
    if base + ".A" in adapters:
      delta = scale * (adapters[base + ".A"].astype(jnp.float32) @ adapters[base + ".B"].astype(jnp.float32))
      w = (w.astype(jnp.float32) + (delta.T if name.endswith("_T") else delta)).astype(w.dtype)
    elif name == EMBED and rows:
      ids = jnp.asarray(sorted(rows), jnp.int32)
      w = w.at[ids].set(jnp.stack([rows[i] for i in sorted(rows)]).astype(w.dtype))
    new.append(w)
  known = {n[:-2] if n.endswith("_T") else n for n in names}
  unknown = [k for k in adapters if not k.startswith("rows.") and k.rsplit(".", 1)[0] not in known]
  if unknown:
    raise InvalidOptionError(f"adapters for weights this model does not have: {unknown[:3]}")
  return jax.tree_util.tree_unflatten(treedef, new)
