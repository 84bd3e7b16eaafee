"""Decoding methods: frozen dataclasses deriving from `base.Method` (the protocol, with its
hooks documented there), all run by the one shared step (`speculative.speculative_step`).
Adding a method is one new file plus a line in METHODS (and its tests)."""

from __future__ import annotations

import ast
import re

from jaxspec.errors import InvalidOptionError, UnknownMethodError
from jaxspec.methods.ar import AR
from jaxspec.methods.auto import Auto
from jaxspec.methods.draft_model import DraftModelSpeculation
from jaxspec.methods.hidden_transfer import HiddenTransfer
from jaxspec.methods.prompt_lookup import PromptLookup
from jaxspec.methods.token_recycling import TokenRecycling
from jaxspec.methods.jacobi import Jacobi
from jaxspec.methods.lookahead import Lookahead
from jaxspec.methods import lud
from jaxspec.methods.sjd import SJD

METHODS = {"ar": AR, "pld": PromptLookup, "recycling": TokenRecycling, "draft": DraftModelSpeculation}
METHODS["jacobi"] = Jacobi
METHODS["lookahead"] = Lookahead
METHODS["sjd"] = SJD
METHODS["hidden_transfer"] = HiddenTransfer
METHODS["auto"] = Auto
METHODS["lud"] = lud.make


def get_method(name: str, **options):
  """Instantiate method `name` with its options; clear errors for unknown names/options."""
  if name not in METHODS:
    raise UnknownMethodError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
  try:
    return METHODS[name](**options)
  except TypeError as e:
    raise InvalidOptionError(f"bad options for method {name!r}: {e}") from e


def parse_method_spec(spec: str) -> tuple[str, dict, str]:
  """"recycling:template=small,k=8" -> ("recycling", {"template": "small", "k": 8}, label).

  Values are Python literals where they parse as one (8, 0.5, True), else strings. The name is
  not checked here; `get_method` does that."""
  name, _, rest = spec.strip().partition(":")
  opts = {}
  for item in filter(None, (i.strip() for i in rest.split(","))):
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise InvalidOptionError(f"bad method option {item!r} in {spec!r}; use name:key=value,key=value")
    try:
      opts[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      opts[key.strip()] = value.strip()
  if not name.strip():
    raise InvalidOptionError(f"no method name in {spec!r}; use name or name:key=value,...")
  return name.strip(), opts, spec.strip()


def parse_method_list(specs: str) -> list[tuple[str, dict, str]]:
  """Several specs separated by ';', spaces or commas: "ar,pld:k=3,recycling" and
  "ar pld:k=3;recycling:template=small,k=8" both work (a comma item with no '=' starts a new method)."""
  items: list[str] = []
  for chunk in re.split(r"[;\s]+", specs.strip()):
    for part in filter(None, chunk.split(",")):
      if items and "=" in part and ":" not in part:
        items[-1] += "," + part  # another option of the current method
      else:
        items.append(part)
  if not items:
    raise InvalidOptionError("no methods given; e.g. --methods 'ar pld recycling:template=small'")
  return [parse_method_spec(i) for i in items]


def method_from_spec(spec: str):
  """An instantiated method from a CLI spec such as "pld:k=3"."""
  name, opts, _ = parse_method_spec(spec)
  return get_method(name, **opts)
