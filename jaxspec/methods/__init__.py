"""Decoding methods. Each is a frozen dataclass (hashable: a jit static argument) with
`scratch_tokens`, `max_commit`, `init_method_state(config, B)` and `step(model, state, sampling,
eos_ids, attn_impl)`. Adding a method is one new file plus a line in METHODS."""

from __future__ import annotations

from jaxspec.errors import InvalidOptionError, UnknownMethodError
from jaxspec.methods.ar import AR
from jaxspec.methods.prompt_lookup import PromptLookup
from jaxspec.methods.token_recycling import TokenRecycling

METHODS = {"ar": AR, "pld": PromptLookup, "recycling": TokenRecycling}


def get_method(name: str, **options):
  """Instantiate method `name` with its options; clear errors for unknown names/options."""
  if name not in METHODS:
    raise UnknownMethodError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
  try:
    return METHODS[name](**options)
  except TypeError as e:
    raise InvalidOptionError(f"bad options for method {name!r}: {e}") from e
