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
  """(q, k_cache, v_cache, lengths, tree_mask, k_new, v_new), random (seeded by the case)."""
  rng = np.random.default_rng(zlib.crc32(repr((B, T, G, K, lengths, mask_kind)).encode()))
  H = G * K
  q_BxTxHxD = rng.standard_normal((B, T, H, D))
  k_BxKxSxD = rng.standard_normal((B, K, num_slots, D))
  v_BxKxSxD = rng.standard_normal((B, K, num_slots, D))
  k_new_BxKxTxD = rng.standard_normal((B, K, T, D))
  v_new_BxKxTxD = rng.standard_normal((B, K, T, D))
  if mask_kind == "causal":
    tree_TxT = np.tril(np.ones((T, T), bool))
  else:
    parent_T = np.array([-1] + [rng.integers(0, t) for t in range(1, T)])
    tree_TxT = ancestor_mask(parent_T)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q_BxTxHxD), cast(k_BxKxSxD), cast(v_BxKxSxD), jnp.asarray(lengths, jnp.int32),
          jnp.asarray(tree_TxT), cast(k_new_BxKxTxD), cast(v_new_BxKxTxD))


def one_softmax_oracle(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, lengths_B, tree_TxT, k_new_BxKxTxD, v_new_BxKxTxD):
  """The contract written the plain way, in numpy float64: write the new tokens into the cache
  at lengths[b] + u (where that slot exists), then one masked softmax over all S slots."""
  q, k, v, kn, vn = (np.asarray(x, np.float64) for x in (q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, k_new_BxKxTxD,
                                                         v_new_BxKxTxD))
  lengths, tree = np.asarray(lengths_B), np.asarray(tree_TxT, bool)
  B, T, H, D = q.shape
  K, S_ = k.shape[1], k.shape[2]
  G = H // K
  out = np.zeros((B, T, H, D))
  for b in range(B):
    kb, vb = k[b].copy(), v[b].copy()
    allowed_TxS = np.zeros((T, S_), bool)
    allowed_TxS[:, : min(lengths[b], S_)] = True
    for u in range(T):
      if lengths[b] + u < S_:
        kb[:, lengths[b] + u], vb[:, lengths[b] + u] = kn[b, :, u], vn[b, :, u]
        allowed_TxS[:, lengths[b] + u] = tree[:, u]
    for h in range(H):
      s_TxS = q[b, :, h] @ kb[h // G].T / np.sqrt(D)
      s_TxS = np.where(allowed_TxS, s_TxS, -np.inf)
      p_TxS = np.exp(s_TxS - s_TxS.max(-1, keepdims=True))
      out[b, :, h] = (p_TxS / p_TxS.sum(-1, keepdims=True)) @ vb[h // G]
  return out


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


@pytest.mark.parametrize("B,T,G,K,lengths,mask_kind", CASES)
def test_reference_matches_one_softmax_over_the_written_cache(B, T, G, K, lengths, mask_kind):
  args = make_inputs(B, T, G, K, lengths, mask_kind)
  assert_close(tree_attention_reference(*args), one_softmax_oracle(*args), rtol=1e-5)


def test_reference_without_cache_is_plain_masked_attention():
  q, _, _, _, tree_TxT, k_new, v_new = make_inputs(2, 6, 3, 1, [0, 0], "tree")
  want = one_softmax_oracle(q, k_new, v_new, jnp.zeros((2,), jnp.int32), tree_TxT, k_new, v_new)
  got = tree_attention_reference(q, None, None, jnp.zeros((2,), jnp.int32), tree_TxT, k_new, v_new)
  assert_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("B,T,G,K,lengths,mask_kind", CASES)
def test_kernel_matches_reference(impl, B, T, G, K, lengths, mask_kind):
  args = make_inputs(B, T, G, K, lengths, mask_kind)
  assert_close(KERNELS[impl](*args), tree_attention_reference(*args), rtol=2e-5)


@pytest.mark.parametrize("impl", [None] + list(KERNELS))
def test_edge_lengths_and_garbage_past_the_prefix(impl):
  # lengths: nothing committed; new tokens running past the cache end (no slot for them);
  # longer than the cache (all committed, no new-token slot at all).
  B, T, G, K, lengths = 3, 8, 3, 1, [0, S - 3, S + 50]
  q, k, v, lengths_B, tree_TxT, k_new, v_new = make_inputs(B, T, G, K, lengths, "tree")
  want = one_softmax_oracle(q, k, v, lengths_B, tree_TxT, k_new, v_new)
  # Slots past each row's committed prefix must never count: the kernels never read them (not
  # even as 0 * NaN); the reference's dots run over them with zero weight, so its garbage is finite.
  past_B1S1 = (np.arange(S)[None, :] >= np.asarray(lengths)[:, None])[:, None, :, None]
  k, v = (jnp.where(past_B1S1, jnp.nan if impl else 1e4, x) for x in (k, v))
  attend = tree_attention_reference if impl is None else KERNELS[impl]
  assert_close(attend(q, k, v, lengths_B, tree_TxT, k_new, v_new), want, rtol=2e-5)


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
          jax.ShapeDtypeStruct((T, T), jnp.bool_), jax.ShapeDtypeStruct((B, K, T, D), dtype),
          jax.ShapeDtypeStruct((B, K, T, D), dtype))


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
