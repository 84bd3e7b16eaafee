"""Pallas tree-attention kernels (interpret mode on CPU) against the XLA reference, and lowering.

Interpret mode costs seconds per shape, so the grid is a representative subset: every T, GQA
ratio and mask kind appears, each with ragged lengths in a cache whose S is not a multiple of
the (deliberately small) block sizes, so multi-block loops, partial blocks and several query
blocks all run.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.kernels import tree_attention_gpu as gpu
from jaxspec.kernels import tree_attention_tpu as tpu
from jaxspec.kernels.tree_attention import IMPLS, resolve_impl, tree_attention
from jaxspec.kernels.tree_attention_reference import tree_attention_reference

S, D = 150, 64  # S is not a multiple of either test block_k
KERNELS = {
    "pallas_tpu": functools.partial(
        tpu.tree_attention_tpu, block_sizes=tpu.BlockSizes(block_q=32, block_k=64), interpret=True),
    "pallas_gpu": functools.partial(
        gpu.tree_attention_gpu, block_sizes=gpu.BlockSizes(block_rows=32, block_k=32), interpret=True),
}


def ancestor_mask(parent_T: np.ndarray) -> np.ndarray:
  """Boolean [T, T]: u is t or an ancestor of t (parent[0] = -1, parent[t] < t)."""
  T = len(parent_T)
  mask_TxT = np.eye(T, dtype=bool)
  for t in range(1, T):
    mask_TxT[t] |= mask_TxT[parent_T[t]]
  return mask_TxT


def make_inputs(B, T, G, K, lengths, mask_kind, dtype=jnp.float32, num_slots=S):
  rng = np.random.default_rng(zlib.crc32(repr((B, T, G, K, lengths, mask_kind)).encode()))
  H = G * K
  q_BxTxHxD = rng.standard_normal((B, T, H, D))
  k_BxKxSxD = rng.standard_normal((B, K, num_slots, D))
  v_BxKxSxD = rng.standard_normal((B, K, num_slots, D))
  if mask_kind == "causal":
    tree_TxT = np.tril(np.ones((T, T), bool))
  else:
    parent_T = np.array([-1] + [rng.integers(0, t) for t in range(1, T)])
    tree_TxT = ancestor_mask(parent_T)
  return (jnp.asarray(q_BxTxHxD, dtype), jnp.asarray(k_BxKxSxD, dtype),
          jnp.asarray(v_BxKxSxD, dtype), jnp.asarray(lengths, jnp.int32), jnp.asarray(tree_TxT))


def assert_close(out, ref, rtol):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


CASES = [  # B, T, G (= H / K), K, lengths, mask
    pytest.param(1, 1, 1, 2, [37], "tree", id="T1-G1"),
    pytest.param(3, 5, 3, 2, [1, 37, 130], "tree", id="T5-G3"),
    pytest.param(3, 16, 7, 1, [1, 37, 130], "causal", id="T16-G7-causal"),
    pytest.param(3, 64, 1, 2, [1, 37, 130], "tree", id="T64-G1"),
    pytest.param(1, 64, 3, 1, [130], "causal", id="T64-G3-causal"),
]


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("B,T,G,K,lengths,mask_kind", CASES)
def test_kernel_matches_reference(impl, B, T, G, K, lengths, mask_kind):
  args = make_inputs(B, T, G, K, lengths, mask_kind)
  assert_close(KERNELS[impl](*args), tree_attention_reference(*args), rtol=2e-5)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_edge_lengths_and_garbage_past_the_tree(impl):
  # lengths: nothing committed; new tokens running past the cache end (the reference has no
  # slot for them); longer than the cache (all committed, no new-token slot at all).
  B, T, G, K, lengths = 3, 8, 3, 1, [0, S - 3, S + 50]
  q, k, v, lengths_B, tree_TxT = make_inputs(B, T, G, K, lengths, "tree")
  ref = tree_attention_reference(q, k, v, lengths_B, tree_TxT)
  # Slots past each row's scratch region must never be read into the result, not even as 0 * NaN.
  slot_S = np.arange(S)
  past_B1S1 = (slot_S[None, :] >= np.asarray(lengths)[:, None] + T)[:, None, :, None]
  k, v = (jnp.where(past_B1S1, jnp.nan, x) for x in (k, v))
  assert_close(KERNELS[impl](q, k, v, lengths_B, tree_TxT), ref, rtol=2e-5)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_bf16(impl):
  args = make_inputs(2, 5, 3, 2, [1, 130], "tree", dtype=jnp.bfloat16)
  out = KERNELS[impl](*args)
  assert out.dtype == jnp.bfloat16
  assert_close(out, tree_attention_reference(*args), rtol=2e-2)


def test_dispatch():
  assert resolve_impl("auto") == {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(
      jax.default_backend(), "xla")
  with pytest.raises(ValueError, match="unknown tree attention impl"):
    resolve_impl("flash")
  args = make_inputs(2, 3, 3, 1, [1, 37], "tree", num_slots=40)
  ref = tree_attention_reference(*args, scale=0.3)
  for impl in IMPLS:
    assert_close(tree_attention(*args, impl=impl, scale=0.3, interpret=True), ref, rtol=2e-5)


def _abstract_args(B, T, H, K, S, D, dtype):
  return (jax.ShapeDtypeStruct((B, T, H, D), dtype), jax.ShapeDtypeStruct((B, K, S, D), dtype),
          jax.ShapeDtypeStruct((B, K, S, D), dtype), jax.ShapeDtypeStruct((B,), jnp.int32),
          jax.ShapeDtypeStruct((T, T), jnp.bool_))


LOWERING_SHAPES = [  # B, T, H, K, S, D, dtype
    pytest.param(4, 64, 14, 2, 4000, 128, jnp.bfloat16, id="bf16-G7"),
    pytest.param(1, 1, 9, 3, 100, 64, jnp.float32, id="f32-T1-G3"),
]


@pytest.mark.parametrize("B,T,H,K,S,D,dtype", LOWERING_SHAPES)
def test_tpu_kernel_lowers_to_mosaic(B, T, H, K, S, D, dtype):
  exported = jax.export.export(jax.jit(tpu.tree_attention_tpu), platforms=["tpu"])(
      *_abstract_args(B, T, H, K, S, D, dtype))
  assert "tpu_custom_call" in exported.mlir_module()
  assert exported.out_avals[0].shape == (B, T, H, D)


@pytest.mark.parametrize("B,T,H,K,S,D,dtype", LOWERING_SHAPES)
def test_gpu_kernel_lowers_to_triton(B, T, H, K, S, D, dtype):
  # Triton custom calls carry no export compatibility guarantee; lowering is what we check.
  exported = jax.export.export(
      jax.jit(gpu.tree_attention_gpu), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*_abstract_args(B, T, H, K, S, D, dtype))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
  assert exported.out_avals[0].shape == (B, T, H, D)


def test_kernels_import_nothing_from_the_app():
  """kernels/ is a library of its own: it imports only jaxspec.kernels (the app passes it the
  mesh explicitly through AttentionImpl)."""
  import ast
  from pathlib import Path
  kernels = Path(gpu.__file__).parent
  outside = []
  for path in sorted(kernels.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      outside += [f"{path.name}: {n}" for n in names
                  if n.split(".")[0] == "jaxspec" and not n.startswith("jaxspec.kernels")]
  assert len(list(kernels.glob("*.py"))) >= 5 and not outside, outside
