"""Decoding methods. Each is a frozen dataclass (hashable: a jit static argument) with
`scratch_tokens`, `max_commit`, `init_method_state(config, B, num_slots, dtype)` and
`step(model, state, sampling, eos_ids, attn_impl, aux=None)`. Speculative methods derive from
`speculative.SpeculativeMethod` and only write `tree`, `propose` and `update`.
Optional hooks: `resolve(bundle)` (pick concrete options per model), `aux_bundle(bundle)` (an
auxiliary draft model), `prefill_method(aux, state, prompt_len, attn_impl)`, `memory_key`
(state kept across calls in bundle.method_memory), `observe(bundle, mean_accepted, steps)`.
Adding a method is one new file plus a line in METHODS."""

from __future__ import annotations

from jaxspec.errors import InvalidOptionError, UnknownMethodError
from jaxspec.methods.ar import AR
from jaxspec.methods.draft_model import DraftModelSpeculation
from jaxspec.methods.prompt_lookup import PromptLookup
from jaxspec.methods.token_recycling import TokenRecycling
from jaxspec.methods.jacobi import Jacobi
from jaxspec.methods.lookahead import Lookahead
from jaxspec.methods.sjd import SJD

METHODS = {"ar": AR, "pld": PromptLookup, "recycling": TokenRecycling, "draft": DraftModelSpeculation}
METHODS["jacobi"] = Jacobi
METHODS["lookahead"] = Lookahead
METHODS["sjd"] = SJD


def get_method(name: str, **options):
  """Instantiate method `name` with its options; clear errors for unknown names/options."""
  if name not in METHODS:
    raise UnknownMethodError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
  try:
    return METHODS[name](**options)
  except TypeError as e:
    raise InvalidOptionError(f"bad options for method {name!r}: {e}") from e
