"""Hugging Face folder (config.json + *.safetensors) -> Decoder parameters.

Tensors are read one at a time from the safetensors files and put straight onto their device
(or onto the sharding a caller supplies): no full host copy of the model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxspec.errors import ModelFolderError
from jaxspec.models.config import ModelConfig, config_from_hf
from jaxspec.models.decoder import Decoder


def read_config(folder: Path) -> ModelConfig:
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise ModelFolderError(f"{folder} has no config.json; point --model at a Hugging Face model folder "
                           "or a registered name (see `jaxspec models`)")
  try:
    return config_from_hf(json.loads(path.read_text()))
  except ValueError as e:
    raise ModelFolderError(f"{path}: {e}") from e


def hf_tensor_names(config: ModelConfig) -> dict[tuple, tuple[str, bool]]:
  """Our param path -> (HF tensor name, transpose?). HF linear weights are [out, in]."""
  names: dict[tuple, tuple[str, bool]] = {
      ("embed_VxE",): ("model.embed_tokens.weight", False),
      ("final_norm_E",): ("model.norm.weight", False),
  }
  if not config.tie_embeddings:
    names[("lm_head_ExV",)] = ("lm_head.weight", True)
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    names[("blocks", i, "attn_norm_E")] = (p + "input_layernorm.weight", False)
    names[("blocks", i, "mlp_norm_E")] = (p + "post_attention_layernorm.weight", False)
    for ours, theirs in (("q_ExHD", "q_proj"), ("k_ExKD", "k_proj"), ("v_ExKD", "v_proj"), ("o_HDxE", "o_proj")):
      names[("blocks", i, "attn", ours)] = (p + f"self_attn.{theirs}.weight", True)
    if config.qkv_bias:
      for ours, theirs in (("q_bias", "q_proj"), ("k_bias", "k_proj"), ("v_bias", "v_proj")):
        names[("blocks", i, "attn", ours)] = (p + f"self_attn.{theirs}.bias", False)
    for ours, theirs in (("gate_ExF", "gate_proj"), ("up_ExF", "up_proj"), ("down_FxE", "down_proj")):
      names[("blocks", i, "mlp", ours)] = (p + f"mlp.{theirs}.weight", True)
  return names


def _unreadable(f: Path, e: Exception) -> ModelFolderError:
  return ModelFolderError(f"{f} is truncated or corrupted ({type(e).__name__}: {e}); copy it again, or for a "
                          "registered model run `jaxspec pull NAME --force`")


def _tensor_index(folder: Path) -> dict[str, Path]:
  files = sorted(Path(folder).glob("*.safetensors"))
  if not files:
    raise ModelFolderError(f"{folder} has no *.safetensors weights; re-run `jaxspec pull` or copy the weights in")
  index = {}
  for f in files:
    try:
      with safe_open(f, framework="numpy") as st:
        for k in st.keys():
          index[k] = f
    except (SafetensorError, OSError) as e:
      raise _unreadable(f, e) from e
  return index


def load_decoder(
    folder: str | Path,
    dtype=jnp.float32,
    place: Callable[[tuple, np.ndarray], jax.Array] | None = None,
    shardings: Callable[[ModelConfig, nnx.State], Any] | None = None,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
  """Read a HF folder into (config, graphdef, params) with params in `dtype`.

  `place(path, host_array)` puts one tensor on device (default: `jax.device_put`).
  `shardings(config, abstract_params)` (e.g. `jaxspec.sharding.sharding_loader(mesh)`) gives
  each parameter a Sharding instead: every tensor is then built with
  `jax.make_array_from_callback`, reading from the file only the slices this process's devices
  hold (a host never materializes a tensor it keeps no full copy of).
  """
  folder = Path(folder)
  config = read_config(folder)
  abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  index = _tensor_index(folder)
  names = hf_tensor_names(config)
  missing = [n for n, _ in names.values() if n not in index]
  if missing:
    raise ModelFolderError(f"{folder} is missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                           "the folder is incomplete or not a Llama/Qwen2 checkpoint")
  place = place or (lambda path, arr: jax.device_put(arr))
  per_param = dict(nnx.to_flat_state(shardings(config, params))) if shardings else None
  handles = {}
  f = None
  try:
    for path, var in nnx.to_flat_state(params):
      name, transpose = names[tuple(path)]
      f = index[name]
      if f not in handles:
        handles[f] = safe_open(f, framework="numpy")
      if per_param is not None:
        var.set_value(_read_sharded(handles[f], name, transpose, var.shape, dtype, per_param[tuple(path)]))
        continue
      arr = handles[f].get_tensor(name)
      arr = arr.T if transpose else arr
      if arr.shape != var.shape:
        raise ModelFolderError(f"{name} has shape {arr.shape}, config.json implies {var.shape}; "
                               "config.json does not match the weights")
      var.set_value(place(tuple(path), np.ascontiguousarray(arr.astype(np.dtype(dtype)))))
  except (SafetensorError, OSError) as e:
    raise _unreadable(f, e) from e
  finally:
    handles.clear()
  return config, graphdef, params


def _read_sharded(handle, name: str, transpose: bool, shape, dtype, sharding) -> jax.Array:
  """One tensor onto `sharding`, reading only the slices the local devices hold (each distinct
  slice once: replicated tensors are read once per process)."""
  sl = handle.get_slice(name)
  file_shape = tuple(sl.get_shape())
  if (file_shape[::-1] if transpose else file_shape) != tuple(shape):
    raise ModelFolderError(f"{name} has shape {file_shape}, config.json implies {tuple(shape)}; "
                           "config.json does not match the weights")
  read: dict = {}

  def piece(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in read:
      a = sl[index[::-1]].T if transpose else sl[index]
      read[key] = np.ascontiguousarray(a.astype(np.dtype(dtype)))
    return read[key]

  return jax.make_array_from_callback(tuple(shape), sharding, piece)
