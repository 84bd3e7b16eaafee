"""Autoregressive decoding: one token per forward, the baseline every method must match. It is
the empty draft of the shared step (`Method`'s defaults): the verifier samples the next token
from the target at the pending token."""

from __future__ import annotations

import dataclasses

from jaxspec.methods.base import Method


@dataclasses.dataclass(frozen=True)
class AR(Method):
  """Plain AR decoding, greedy or sampled with the shared SamplingConfig."""

  name = "ar"
