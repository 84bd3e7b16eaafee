"""Files of trained method parameters (hidden-transfer heads, LUD adapters) kept apart from the
base model: `<dir>/params.safetensors` + `<dir>/meta.json`.

meta.json records what the parameters were trained for (kind, base model name and fingerprint,
layer, k, embed and vocab size, training data manifest, eval figures) and the sha256 of the
weights file. `load_params_file` refuses, with a one-line error naming the fix, a missing or
corrupted file, another kind, or parameters made for another base model or vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxspec.errors import HeadsFileError
from jaxspec.models.cache_manifest import file_sha256

WEIGHTS, META = "params.safetensors", "meta.json"
FINGERPRINT_KEY = "base_fingerprint"


def model_fingerprint(bundle) -> str:
  """sha256 (16 hex) of the base model's config and weights (rounded to bf16, so the fp32 and
  bf16 loads of one model agree): what trained parameters depend on. Computed once per bundle."""
  cached = bundle.method_memory.get(FINGERPRINT_KEY)
  if cached is not None:
    return cached
  import jax
  import jax.numpy as jnp
  digest = hashlib.sha256(json.dumps(bundle.config.__dict__, sort_keys=True, default=str).encode())
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(bundle.params), key=lambda pl: str(pl[0])):
    if "_T'" in str(path):  # the CPU transposed copies (cpu_layout): derived, not part of the model
      continue
    digest.update(str(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(jnp.asarray(leaf).astype(jnp.bfloat16))).view(np.uint16).tobytes())
  bundle.method_memory[FINGERPRINT_KEY] = digest.hexdigest()[:16]
  return bundle.method_memory[FINGERPRINT_KEY]


def save_params_file(folder: str | Path, params: dict[str, np.ndarray], meta: dict, dtype=np.float32) -> Path:
  """Write params (flat name -> array; floating arrays stored as `dtype`, integer ones, e.g. token
  ids, as they are) and meta (+ the weights' sha256), each atomically."""
  from safetensors.numpy import save_file
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tmp = folder / f".{WEIGHTS}.tmp-{os.getpid()}"
  stored = lambda a: a if np.issubdtype(a.dtype, np.integer) else a.astype(dtype)
  save_file({k: np.ascontiguousarray(stored(np.asarray(v))) for k, v in params.items()}, str(tmp))
  os.chmod(tmp, 0o644)
  os.replace(tmp, folder / WEIGHTS)
  meta = dict(meta, sha256=file_sha256(folder / WEIGHTS))
  tmp = folder / f".{META}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, folder / META)
  return folder


def read_meta(folder: str | Path) -> dict:
  folder = Path(folder)
  if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
    raise HeadsFileError(f"{folder} is not a trained-parameters folder (needs {META} and {WEIGHTS}); "
                         f"train one with `jaxspec train ...` or pass the right path")
  try:
    return json.loads((folder / META).read_text())
  except ValueError as e:
    raise HeadsFileError(f"{folder / META} is not valid JSON ({e}); retrain or restore the folder") from None


def load_params_file(folder: str | Path, bundle, kind: str) -> tuple[dict[str, np.ndarray], dict]:
  """(params, meta) after checking integrity and that they belong to `bundle`'s model."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  folder = Path(folder)
  meta = read_meta(folder)
  if meta.get("kind") != kind:
    raise HeadsFileError(f"{folder} holds {meta.get('kind')!r} parameters, not {kind!r}")
  if file_sha256(folder / WEIGHTS) != meta.get("sha256"):
    raise HeadsFileError(f"{folder / WEIGHTS} does not match the sha256 in {META} (corrupted or replaced); "
                         f"retrain or restore the folder")
  c = bundle.config
  if meta.get("vocab_size") != c.vocab_size or meta.get("embed_dim") != c.embed_dim:
    raise HeadsFileError(f"{folder} was trained for vocab {meta.get('vocab_size')} / embed {meta.get('embed_dim')}, "
                         f"the model has {c.vocab_size} / {c.embed_dim}; use heads trained for {bundle.name}")
  if meta.get(FINGERPRINT_KEY) != model_fingerprint(bundle):
    raise HeadsFileError(f"{folder} was trained for base model {meta.get('base_model')!r} (fingerprint "
                         f"{meta.get(FINGERPRINT_KEY)}), not this {bundle.name!r} ({model_fingerprint(bundle)}); "
                         f"train heads for this model with `jaxspec train hidden-transfer --model ...`")
  try:
    return load_file(str(folder / WEIGHTS)), meta
  except (SafetensorError, OSError) as e:
    raise HeadsFileError(f"{folder / WEIGHTS} cannot be read ({e}); retrain or restore the folder") from None
