"""Attention kernels (Pallas TPU/GPU) beside their XLA references. Imported as jaxspec.kernels."""

from jaxspec.kernels.tree_attention import AttentionImpl, tree_attention
from jaxspec.kernels.tree_attention_reference import tree_attention_reference

__all__ = ["AttentionImpl", "tree_attention", "tree_attention_reference"]
