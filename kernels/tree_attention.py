"""`tree_attention`: one entry point, several implementations chosen by `impl`.

impl="auto" picks the Pallas kernel for the backend (TPU: Mosaic, GPU: Triton) and the XLA
reference elsewhere (CPU). "xla" forces the reference; "pallas_tpu" / "pallas_gpu" force a
kernel (on CPU only with interpret=True). Every implementation satisfies the contract
documented in `tree_attention_reference`.

A Pallas call is opaque to XLA's partitioner: under a sharded decode, pass an `AttentionImpl`
naming the mesh and the mesh axes of the batch and kv-head dimensions, and the kernel runs per
shard under `shard_map`. The XLA reference is partitioned by XLA itself and ignores them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxspec.kernels.tree_attention_gpu import tree_attention_gpu
from jaxspec.kernels.tree_attention_reference import tree_attention_reference
from jaxspec.kernels.tree_attention_tpu import tree_attention_tpu

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  """Which implementation runs (`name`, one of IMPLS) and, on a mesh, where: a Pallas kernel
  runs per shard with the batch split over `batch_axes` and kv heads over `kv_head_axes` (each
  only where it divides the size; None: replicated). Hashable: a static jit argument."""

  name: str = "auto"
  mesh: Mesh | None = None
  batch_axes: MeshAxes = None
  kv_head_axes: MeshAxes = None


def resolve_impl(impl: str | AttentionImpl = "auto") -> str:
  """The concrete implementation `impl` means on the current default backend."""
  name = impl.name if isinstance(impl, AttentionImpl) else impl
  if name not in IMPLS:
    raise ValueError(f"unknown tree attention impl {name!r}; choose one of {IMPLS}")
  if name == "auto":
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "xla")
  return name


def _dividing(mesh: Mesh, axes: MeshAxes, size: int) -> MeshAxes:
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if names and size % math.prod(mesh.shape[n] for n in names) == 0 else None


def tree_attention(q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B, tree_mask_TxT, k_new_BxKxTxD,
                   v_new_BxKxTxD, *, impl: str | AttentionImpl = "auto", scale: float | None = None,
                   interpret: bool = False) -> jax.Array:
  """Attention of T new queries over each row's committed prefix (cache slots < lengths[b]) and
  the tree-masked new tokens (`k_new`, `v_new` [B, K, T, D]): [B, T, H, D].

  tree_mask: [T, T] for the batch, or [B, T, T] per row. A [B, T, T] mask or no cache
  (`k_cache` None: training) always takes the XLA path: the Pallas kernels take one mask and a
  cache. interpret=True runs a Pallas kernel in interpret mode (CPU, for tests).
  """
  name = resolve_impl(impl)
  args = (q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B, tree_mask_TxT, k_new_BxKxTxD, v_new_BxKxTxD)
  if name == "xla" or tree_mask_TxT.ndim == 3 or k_cache_BxKxSxD is None:
    return tree_attention_reference(*args, scale=scale)
  kernel = functools.partial(tree_attention_tpu if name == "pallas_tpu" else tree_attention_gpu,
                             scale=scale, interpret=interpret)
  mesh = impl.mesh if isinstance(impl, AttentionImpl) else None
  if mesh is None:
    return kernel(*args)
  B, _, H, _ = q_BxTxHxD.shape
  K = k_cache_BxKxSxD.shape[1]
  b = _dividing(mesh, impl.batch_axes, B)
  h = _dividing(mesh, impl.kv_head_axes, math.gcd(H, K))  # whole head groups per shard
  q_spec, c_spec = P(b, None, h, None), P(b, h, None, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, c_spec, c_spec, P(b), P(), c_spec, c_spec),
                       out_specs=q_spec, check_vma=False)(*args)
