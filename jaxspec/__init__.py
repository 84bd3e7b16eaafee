"""jaxspec: fast, lossless decoding for JAX/Flax NNX language models.

    import jaxspec
    bundle = jaxspec.load("smollm2-135m-instruct")
    out = jaxspec.generate(bundle, ["The capital of France is"], max_new_tokens=32)
"""

import os as _os

# transformers prints a torch advisory on import; we use it for tokenizers/configs only.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jaxspec.api import GenerateResult, GenerateStats, encode_prompts, generate, stream
from jaxspec.engine import init_state, plan_sizes, prefill, run_steps
from jaxspec.errors import (ChecksumError, HeadsFileError, InvalidOptionError, JaxspecError, ModelFolderError,
                            ModelNotFoundError, PromptTooLongError, UnknownMethodError)
from jaxspec.methods import METHODS, get_method
from jaxspec.models.bundle import ModelBundle, load_model
from jaxspec.sampling import SamplingConfig, sample_tokens, target_logprobs

load = load_model

__all__ = [
    "ChecksumError", "GenerateResult", "HeadsFileError", "GenerateStats", "InvalidOptionError", "JaxspecError", "METHODS",
    "ModelBundle", "ModelFolderError", "ModelNotFoundError", "PromptTooLongError", "SamplingConfig",
    "UnknownMethodError", "encode_prompts", "generate", "get_method", "init_state", "load", "load_model",
    "plan_sizes", "prefill", "run_steps", "sample_tokens", "stream", "target_logprobs",
]
