"""The one place a Hugging Face `config.json` becomes a jaxspec `ModelConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static decoder hyper-parameters (hashable: usable as a jit static argument).

  Dimension letters: V vocab, E embed (d_model), H query heads, K kv heads, D head dim,
  F feed-forward (mlp) width, L layers.
  """

  vocab_size: int  # V
  embed_dim: int  # E
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int  # K
  head_dim: int  # D
  mlp_dim: int  # F
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  model_type: str = "llama"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")

  @property
  def group_size(self) -> int:
    """G: query heads per kv head."""
    return self.num_heads // self.num_kv_heads


def _eos_ids(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Translate a HF config dict (Llama, Mistral, Qwen2 families) into a ModelConfig.

  Raises ValueError for model types we do not implement or unsupported rope scaling.
  """
  model_type = hf.get("model_type", "llama")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise ValueError(f"rope type {rope_type!r} is not supported yet (only the default RoPE)")
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  num_heads = int(hf["num_attention_heads"])
  embed = int(hf["hidden_size"])
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      embed_dim=embed,
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or embed // num_heads),
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=float(theta),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=_eos_ids(hf.get("eos_token_id")),
      model_type=model_type,
  )
