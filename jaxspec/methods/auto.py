"""`auto`: the method for this model and device, never much slower than AR by construction.

Resolves per bundle to a concrete method whose every step pays only for a draft expected to pay
on this device (jaxspec.methods.draft_sizing): when nothing does, steps are 1-token forwards,
i.e. AR plus the drafting bookkeeping. Today that is Token Recycling's tiny tree with a
prompt-lookup chain grafted on its main path (experiments/NOTES.md, "auto"): per step and per
row, a long chain where the text repeats (pld's strength: summarization, RAG, extraction), the
recycled tree elsewhere (which never lost a category on the CPUs measured), or no draft when
neither is expected to pay, each from the acceptance observed so far in this generation and the
device's measured forward times. Drafts run within a loss bound (`max_loss`, default 0.05): were
every draft rejected, a generation would still spend at most 5% more forward time than AR
(draft_sizing; measured: worst prompt 0.95x AR vs 0.88x without, 1.14x vs 1.18x overall,
experiments/LOG.md, session 15). With `heads=DIR` it is hidden_transfer with those heads. The
packaged hidden-transfer heads are not chosen by default: on unseen prompts they measured 1.09x
AR beside this configuration's 1.15x in one run (session 13; their partial pass costs 0.15 of a
forward on steps that verify a head's draft, and their step drafting nothing 1.05x an AR step).
"""

from __future__ import annotations

import dataclasses

from jaxspec.methods import draft_sizing
from jaxspec.methods.base import Method

TEMPLATE = "tiny"
LOOKUP = 5


def _default_method(max_loss=draft_sizing.MAX_LOSS):
  """What `auto` is without heads (before it is resolved against a model)."""
  from jaxspec.methods.token_recycling import TokenRecycling
  return TokenRecycling(template=TEMPLATE, lookup=LOOKUP, max_loss=max_loss)


@dataclasses.dataclass(frozen=True)
class Auto(Method):
  heads: str | None = None  # hidden-transfer heads folder: use them
  # the most a generation may fall behind AR were every draft rejected (None: no bound)
  max_loss: float | None = draft_sizing.MAX_LOSS
  name = "auto"

  def __post_init__(self):
    draft_sizing.check_max_loss("auto", self.max_loss)

  @property
  def memory_key(self) -> str | None:
    """The learned state it keeps across calls: the resolved method's."""
    return None if self.heads is not None else _default_method().memory_key

  def resolve(self, bundle) -> Method:
    from jaxspec.methods.hidden_transfer import HiddenTransfer
    if self.heads is not None:
      return HiddenTransfer(heads=self.heads, max_loss=self.max_loss).resolve(bundle)
    return _default_method(self.max_loss).resolve(bundle)
