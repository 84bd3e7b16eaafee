"""`auto`: the method for this model and device, never slower than AR by construction.

Resolves per bundle to a concrete method whose every step pays only for a draft expected to pay
on this device (jaxspec.methods.draft_sizing): when nothing does, steps are 1-token forwards,
i.e. AR plus the drafting bookkeeping. Today that is Token Recycling's tiny tree with a
prompt-lookup chain grafted on its main path (experiments/NOTES.md, "auto"): per step and per
row, a long chain where the text repeats (pld's strength: summarization, RAG, extraction), the
recycled tree elsewhere (which never lost a category on the CPUs measured), or no draft when
neither is expected to pay, each from the acceptance observed so far in this generation and the
device's measured forward times. With `heads=DIR` it is hidden_transfer with those heads. The
packaged hidden-transfer heads are not chosen by default: on unseen prompts they measured 1.09x
AR beside this configuration's 1.15x in one run (session 13; their partial pass costs 0.15 of a
forward on steps that verify a head's draft, and their step drafting nothing 1.05x an AR step).
"""

from __future__ import annotations

import dataclasses

from jaxspec.methods.base import Method

TEMPLATE = "tiny"
LOOKUP = 5


def _default_method():
  """What `auto` is without heads (before it is resolved against a model)."""
  from jaxspec.methods.token_recycling import TokenRecycling
  return TokenRecycling(template=TEMPLATE, lookup=LOOKUP)


@dataclasses.dataclass(frozen=True)
class Auto(Method):
  heads: str | None = None  # hidden-transfer heads folder: use them
  name = "auto"

  @property
  def memory_key(self) -> str | None:
    """The learned state it keeps across calls: the resolved method's."""
    return None if self.heads is not None else _default_method().memory_key

  def resolve(self, bundle) -> Method:
    from jaxspec.methods.hidden_transfer import HiddenTransfer
    if self.heads is not None:
      return HiddenTransfer(heads=self.heads).resolve(bundle)
    return _default_method().resolve(bundle)
