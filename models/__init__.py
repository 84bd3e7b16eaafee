"""Model definitions and loaders. Imported as jaxspec.models."""

from jaxspec.models.bundle import ModelBundle, default_dtype, load_model
from jaxspec.models.config import ModelConfig, config_from_hf
from jaxspec.models.decoder import Decoder
from jaxspec.models.kv_cache import KVCache, advance, commit, init_cache

__all__ = ["ModelBundle", "ModelConfig", "Decoder", "KVCache", "advance", "commit", "config_from_hf",
           "default_dtype", "init_cache", "load_model"]
