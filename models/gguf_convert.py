"""A llama/qwen2 GGUF file -> a Hugging Face folder (config.json, fp32 model.safetensors, tokenizer).

Weights are dequantized with the `gguf` package (numpy) one tensor at a time and streamed into
the safetensors file, so peak memory is about one tensor, not the whole model. llama.cpp stores
the Q and K rows of llama-arch models permuted for its RoPE; that is undone here, so the folder
matches what `transformers` would save for the same weights. qwen2 files are not permuted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def field_value(reader, key: str, default: Any = None) -> Any:
  """A scalar, string or list metadata value of a GGUFReader, or `default` when absent."""
  field = reader.fields.get(key)
  if field is None:
    return default
  value = field.contents()
  return value.item() if isinstance(value, np.generic) else value


def hf_tensor_name(gguf_name: str) -> str:
  """llama.cpp tensor name -> Hugging Face Llama/Qwen2 name; ValueError for anything else."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _BLOCK_RE.fullmatch(gguf_name)
  if m is None or m.group(2) not in _BLOCK_NAMES:
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama/Qwen2 equivalent")
  return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_llama_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute(w, n_head)` on Q (n_head) or K (n_head_kv) rows.

  llama.cpp groups each head's rows as (2, D/2) -> (D/2, 2), i.e. it interleaves the two RoPE
  halves; this puts the halves back (HF rotate_half layout). Works on [out, in] and [out].
  """
  rest = w.shape[1:]
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _f32_repr(x: float) -> float:
  # GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; keep the value the
  # original config.json spelled.
  return float(str(np.float32(x)))


def hf_config(reader) -> dict[str, Any]:
  """The config.json dict (LlamaConfig / Qwen2Config fields) described by the GGUF metadata."""
  arch = field_value(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})")
  if f"{arch}.rope.scaling.type" in reader.fields or any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise ValueError("GGUF files with RoPE scaling are not supported yet (only the default RoPE)")

  def meta(key, default=None):
    return field_value(reader, f"{arch}.{key}", default)

  names = {t.name for t in reader.tensors}
  embed = int(meta("embedding_length"))
  heads = int(meta("attention.head_count"))
  embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
  vocab = int(embedding.shape[1])  # GGML order is [E, V]
  layers = int(meta("block_count"))
  config = {
      "architectures": [SUPPORTED_ARCHITECTURES[arch]],
      "model_type": arch,
      "hidden_size": embed,
      "intermediate_size": int(meta("feed_forward_length")),
      "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
      "head_dim": int(meta("attention.key_length", embed // heads)),
      "rms_norm_eps": _f32_repr(meta("attention.layer_norm_rms_epsilon")),
      "rope_theta": _f32_repr(meta("rope.freq_base", 10000.0)),
      "rope_scaling": None,
      "vocab_size": vocab,
      "max_position_embeddings": int(meta("context_length")),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": field_value(reader, "tokenizer.ggml.padding_token_id"),
      "hidden_act": "silu",
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": "float32",
  }
  if arch == "llama":
    config.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias=False, pretraining_tp=1)
  else:
    config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
  return config


def _dequantized(tensor, config: dict[str, Any]) -> np.ndarray:
  """One GGUF tensor as a float32 array in HF layout ([out, in] for linear weights)."""
  from gguf.quants import dequantize

  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
  if config["model_type"] == "llama":
    if tensor.name.split(".")[2:3] == ["attn_q"]:
      w = unpermute_llama_qk(w, config["num_attention_heads"])
    elif tensor.name.split(".")[2:3] == ["attn_k"]:
      w = unpermute_llama_qk(w, config["num_key_value_heads"])
  return w


def write_safetensors_streaming(path: Path, reader, config: dict[str, Any], progress: bool = True) -> None:
  """Write every tensor of `reader` as fp32 under its HF name, one tensor in memory at a time."""
  from tqdm.auto import tqdm

  tensors = sorted(reader.tensors, key=lambda t: hf_tensor_name(t.name))
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for t in tensors:
    shape = [int(d) for d in reversed(t.shape.tolist())]
    nbytes = 4 * int(np.prod(shape))
    header[hf_tensor_name(t.name)] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # safetensors: data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for t in tqdm(tensors, desc="dequantize", unit="tensor", disable=not progress):
      w = _dequantized(t, config)
      assert list(w.shape) == header[hf_tensor_name(t.name)]["shape"], t.name
      f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
  """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json into out_dir.

  Returns the config dict. Raises ValueError for architectures or tensors we cannot map.
  """
  from gguf import GGUFReader

  from jaxspec.models.tokenizer_from_gguf import write_tokenizer

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  reader = GGUFReader(str(gguf_path))
  config = hf_config(reader)
  (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  write_tokenizer(reader, out_dir)
  write_safetensors_streaming(out_dir / "model.safetensors", reader, config, progress=progress)
  return config
