"""`auto`: the method for this model and device, never slower than AR by construction.

Resolves per bundle to a concrete method whose every step pays only for a draft expected to pay
on this device (jaxspec.methods.draft_sizing): when nothing does, steps are 1-token forwards,
i.e. AR plus the drafting bookkeeping. Today that is adaptive prompt lookup (the fastest method
measured here: long, repetitive contexts gain, elsewhere it stays at AR; experiments/NOTES.md).
With `heads=DIR` it is hidden_transfer with those heads. The packaged hidden-transfer heads are
not chosen by default: on unseen prompts they measured slower than AR here (their partial pass
costs ~0.4 of a forward every step). Within a generation the chosen method re-decides every step
from the acceptance it observes.
"""

from __future__ import annotations

import dataclasses

from jaxspec.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Auto(Method):
  heads: str | None = None  # hidden-transfer heads folder: use them
  name = "auto"

  def resolve(self, bundle) -> Method:
    from jaxspec.methods.hidden_transfer import HiddenTransfer
    from jaxspec.methods.prompt_lookup import PromptLookup
    if self.heads is not None:
      return HiddenTransfer(heads=self.heads).resolve(bundle)
    return PromptLookup().resolve(bundle)
