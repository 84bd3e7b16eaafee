"""Parameter checkpoints (orbax): save from any mesh, restore onto any other.

    checkpoint.save_params("/ckpt/params", bundle.params)            # every process its shards
    params = checkpoint.restore_params("/ckpt/params", bundle.params, mesh)
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxspec.sharding import ShardingRules, param_shardings


def save_params(path: str | Path, params) -> None:
  """Write (possibly sharded) params as an orbax checkpoint; every process writes its shards."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(Path(path).absolute(), params)


def restore_params(path: str | Path, abstract_params, mesh: Mesh, rules: ShardingRules | None = None,
                   config=None):
  """Restore an orbax params checkpoint straight onto `mesh` under `rules`, whatever mesh it was
  saved from. `abstract_params`: e.g. `nnx.split(nnx.eval_shape(lambda: Decoder(config)))[1]`
  or the `params` of any bundle of the same model."""
  shardings = param_shardings(abstract_params, mesh, rules, config)
  target = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                        abstract_params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(path).absolute(), target)
