"""`tree_attention`: one entry point, several implementations chosen by `impl`.

impl="auto" picks the Pallas kernel for the backend (TPU: Mosaic, GPU: Triton) and the XLA
reference elsewhere (CPU). "xla" forces the reference; "pallas_tpu" / "pallas_gpu" force a
kernel (on CPU only with interpret=True). Every implementation satisfies the contract
documented in `tree_attention_reference`.
"""

from __future__ import annotations

import functools

import jax

from jaxspec.kernels.tree_attention_gpu import tree_attention_gpu
from jaxspec.kernels.tree_attention_reference import tree_attention_reference
from jaxspec.kernels.tree_attention_tpu import tree_attention_tpu

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def resolve_impl(impl: str = "auto") -> str:
  """The concrete implementation `impl` means on the current default backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown tree attention impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "xla")
  return impl


def tree_attention(q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B, tree_mask_TxT, *,
                   impl: str = "auto", scale: float | None = None,
                   interpret: bool = False) -> jax.Array:
  """Attention of T new queries over each row's prefix and the tree-masked new tokens: [B,T,H,D].

  tree_mask: [T, T] for the batch, or [B, T, T] per row (always the XLA path: the Pallas kernels
  take one mask). interpret=True runs a Pallas kernel in interpret mode (CPU, for tests).
  """
  impl = resolve_impl(impl)
  args = (q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B, tree_mask_TxT)
  if impl == "xla" or tree_mask_TxT.ndim == 3:  # XLA partitions this itself under a mesh
    return tree_attention_reference(*args, scale=scale)
  kernel = tree_attention_tpu if impl == "pallas_tpu" else tree_attention_gpu
  # A Pallas call is opaque to XLA's partitioner: under a sharded decode it runs per shard
  # (shard_map over batch and kv heads); otherwise this is a plain call.
  from jaxspec.sharding import partition_attention
  return partition_attention(functools.partial(kernel, scale=scale, interpret=interpret), *args)
