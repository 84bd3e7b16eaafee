"""A GGUF's tokenizer metadata -> tokenizer.json + tokenizer_config.json (no torch).

The metadata is read with the `gguf` package and handed to transformers' GGUF tokenizer
converter (`convert_gguf_tokenizer`, internal API: tested with transformers 5.24), which picks
the BPE model, pre-tokenizer regex and special tokens. We add what it lacks:
- "smollm" pre-tokenizer (SmolLM/SmolLM2): digits split one by one before the GPT-2 regex,
  as in SmolLM2's own tokenizer.json;
- "qwen2": the NFC normalizer of Qwen2's own tokenizer.json.
The result is checked against the GGUF's own token ids before it is written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from jaxspec.models.gguf_convert import field_value


def gguf_tokenizer_dicts(reader) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """(architecture, tokenizer_dict, tokenizer_config) in the format of transformers' GGUF reader."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

  architecture = field_value(reader, "general.architecture")
  grouped = {}
  for group, renames in GGUF_TOKENIZER_MAPPING.items():
    grouped[group] = {}
    for key, name in renames.items():
      value = field_value(reader, f"tokenizer.{key}")
      if value is not None:
        grouped[group][name] = value
  tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer.get("tokenizer_type") == "llama":  # as transformers does: llama.cpp's default for sentencepiece
    tokenizer_config.setdefault("add_bos_token", True)
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
    token_id = tokenizer.get(key)
    tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
  return architecture, tokenizer, tokenizer_config


def build_backend(architecture: str, tokenizer_dict: dict[str, Any]):
  """The `tokenizers.Tokenizer` for this vocabulary."""
  from tokenizers import normalizers, pre_tokenizers
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (
      GGUF_PRE_TOKENIZER_SPLITS,
      convert_gguf_tokenizer,
  )

  backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
  pre = tokenizer_dict.get("pre_tokenizer_type")
  if pre == "smollm":
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
  elif pre == "qwen2":
    backend.normalizer = normalizers.NFC()
  elif tokenizer_dict.get("tokenizer_type") == "gpt2" and pre not in GGUF_PRE_TOKENIZER_SPLITS:
    warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown: using the GPT-2 split, which may tokenize "
                  "some text differently from llama.cpp", stacklevel=2)
  return backend


def check_against_gguf(backend, tokenizer_dict: dict[str, Any]) -> None:
  """Every GGUF token id maps to the same token here, and special tokens encode whole.

  Raises ValueError naming the first mismatch.
  """
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  tokens = tokenizer_dict["tokens"]
  if tokenizer_dict.get("tokenizer_type") == "gpt2":
    alphabet = set(bytes_to_unicode().values())
    for i, token in enumerate(tokens):
      found = backend.token_to_id(token)
      # The converter respells the rare tokens that are not in the byte alphabet.
      if found != i and set(token) <= alphabet:
        raise ValueError(f"token {token!r} is id {i} in the GGUF but {found} in the converted tokenizer")
  for i, (token, token_type) in enumerate(zip(tokens, tokenizer_dict.get("token_type") or ())):
    if token_type == 3 and backend.token_to_id(token) == i:  # CONTROL
      ids = backend.encode(token, add_special_tokens=False).ids
      if ids != [i]:
        raise ValueError(f"special token {token!r} (id {i}) encodes to {ids}, not one token")


def write_tokenizer(reader, out_dir: str | Path) -> dict[str, Any]:
  """Write tokenizer.json and tokenizer_config.json (with the chat template); return the config."""
  out_dir = Path(out_dir)
  architecture, tokenizer_dict, tokenizer_config = gguf_tokenizer_dicts(reader)
  backend = build_backend(architecture, tokenizer_dict)
  check_against_gguf(backend, tokenizer_dict)
  backend.save(str(out_dir / "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": tokenizer_config["bos_token"],
      "eos_token": tokenizer_config["eos_token"],
      "unk_token": tokenizer_config["unk_token"],
      "pad_token": tokenizer_config["pad_token"] or tokenizer_config["eos_token"],
      "add_bos_token": bool(tokenizer_config.get("add_bos_token", False)),
      "add_eos_token": bool(tokenizer_config.get("add_eos_token", False)),
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(field_value(reader, f"{architecture}.context_length", 4096)),
  }
  if "chat_template" in tokenizer_config:
    config["chat_template"] = tokenizer_config["chat_template"]
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
  return config
