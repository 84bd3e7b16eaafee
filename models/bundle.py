"""A loaded model: config, NNX graphdef + params (split once), and its tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.errors import ModelFolderError
from jaxspec.models.config import ModelConfig


def default_dtype():
  """fp32 on CPU (bf16 matmuls are slow there), bf16 on TPU/GPU."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclasses.dataclass
class ModelBundle:
  name: str
  path: Path
  config: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: Any
  dtype: Any
  # Per-bundle state that methods keep across calls (e.g. Token Recycling's adjacency matrix).
  method_memory: dict = dataclasses.field(default_factory=dict)
  # Set when params live on a device mesh (jaxspec.sharding): generate/stream decode on it.
  mesh: Any = None
  rules: Any = None
  # Set when params live in one huge-page host block (jaxspec.models.host_arena; CPU).
  huge_pages: bool = False

  @property
  def eos_ids(self) -> tuple[int, ...]:
    ids = set(self.config.eos_token_ids)
    if getattr(self.tokenizer, "eos_token_id", None) is not None:
      ids.add(int(self.tokenizer.eos_token_id))
    return tuple(sorted(ids))

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params))

  @property
  def param_bytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))

  def model(self):
    """The NNX module (merged view of graphdef + params)."""
    return nnx.merge(self.graphdef, self.params)


def load_tokenizer(folder: Path):
  from transformers import AutoTokenizer  # heavy import, only when loading
  try:
    return AutoTokenizer.from_pretrained(str(folder))
  except Exception as e:  # transformers raises many types for broken folders
    raise ModelFolderError(f"cannot load the tokenizer from {folder} ({type(e).__name__}: {e}); "
                           "the folder needs tokenizer.json/tokenizer_config.json") from e


def load_model(model: str | Path = "smollm2-135m-instruct", dtype=None, *, progress: bool = True,
               place=None, mesh=None, rules=None, few_token_layout: bool = False,
               huge_pages: bool | None = None) -> ModelBundle:
  """Load a registered name, a local HF folder or a hub id into a ModelBundle.

  dtype defaults to fp32 on CPU and bf16 on accelerators. With `mesh` (jaxspec.mesh.make_mesh)
  each parameter is read shard by shard straight onto its sharding under `rules`
  (default jaxspec.sharding.DEFAULT_RULES), and the bundle decodes on that mesh.
  `few_token_layout` adds [out, in] weight copies used by forwards of T > 1 tokens (faster
  speculative verification on XLA CPU; see jaxspec.models.cpu_layout).
  `huge_pages` (default: on for the CPU backend without a mesh) moves the weights into one
  huge-page host block (faster forwards where page walks are costly; jaxspec.models.host_arena).
  """
  from jaxspec.models.hf_loader import load_decoder
  from jaxspec.models.pull import resolve_model_path

  dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
  folder = resolve_model_path(str(model), progress=progress)
  shardings = None
  if mesh is not None:
    from jaxspec.sharding import DEFAULT_RULES, sharding_loader
    rules = rules or DEFAULT_RULES
    shardings = sharding_loader(mesh, rules)
  config, graphdef, params = load_decoder(folder, dtype=dtype, place=place, shardings=shardings)
  if few_token_layout:
    from jaxspec.models.cpu_layout import add_transposed_weights
    graphdef, params = add_transposed_weights(graphdef, params)
  if huge_pages is None:
    huge_pages = mesh is None and jax.default_backend() == "cpu"
  if huge_pages:
    from jaxspec.models.host_arena import into_huge_pages
    params = into_huge_pages(params)
  return ModelBundle(name=str(model), path=Path(folder), config=config, graphdef=graphdef,
                     params=params, tokenizer=load_tokenizer(folder), dtype=jnp.dtype(dtype),
                     mesh=mesh, rules=rules if mesh is not None else None, huge_pages=bool(huge_pages))
