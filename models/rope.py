"""Rotary position embedding in the Hugging Face convention (rotate halves, not pairs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B, T, D] for integer positions."""
  inv_freq_D2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BxTxD2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_D2
  angles_BxTxD = jnp.concatenate([angles_BxTxD2, angles_BxTxD2], axis=-1)
  return jnp.cos(angles_BxTxD), jnp.sin(angles_BxTxD)


def apply_rope(x_BxTxNxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
  """Rotate x [B, T, N heads, D] by the per-position angles."""
  half = x_BxTxNxD.shape[-1] // 2
  x1, x2 = x_BxTxNxD[..., :half], x_BxTxNxD[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BxTxD[:, :, None, :], sin_BxTxD[:, :, None, :]
  out = x_BxTxNxD.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x_BxTxNxD.dtype)
