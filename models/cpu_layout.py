"""Second weight layout for few-token forwards on CPU.

Speculative verification feeds T = 2..64 tokens per forward. On XLA CPU, x[T, in] @ W[in, out]
then leaves the fast matrix-vector path (about 2x the T=1 cost at T=4, noisy measurement);
W[out, in] @ x.T streams the weight once (about 1.1-1.4x). `add_transposed_weights` stores
[out, in] copies beside the [in, out] weights; `models.decoder.linear` uses them when T > 1,
so AR (T=1) keeps its layout. Costs a second copy of the projection weights in host memory;
off by default on accelerators, where the matrix units do not care.
"""

from __future__ import annotations

from flax import nnx

from jaxspec.models.decoder import Attention, Mlp

PROJECTIONS = {Attention: ("q_ExHD", "k_ExKD", "v_ExKD", "o_HDxE"), Mlp: ("gate_ExF", "up_ExF", "down_FxE")}


def add_transposed_weights(graphdef, params):
  """(graphdef, params) with an [out, in] copy (`<name>_T`) of every projection weight."""
  model = nnx.merge(graphdef, params)
  for _, module in nnx.iter_modules(model):
    for cls, names in PROJECTIONS.items():
      if isinstance(module, cls):
        for name in names:
          w = getattr(module, name)
          axes = w.get_metadata().get("logical_axes")
          setattr(module, name + "_T", nnx.Param(w[...].T, logical_axes=tuple(reversed(axes)) if axes else None))
  return nnx.split(model)


def strip_transposed_weights(params):
  """Params without the `_T` copies (for saving checkpoints in the canonical layout)."""
  flat = [(k, v) for k, v in nnx.to_flat_state(params) if not str(k[-1]).endswith("_T")]
  return nnx.from_flat_state(flat)
