"""The static layout of one step's forward: the verified tree first, then named extra segments
(a lookahead window; next: hidden-transfer pseudo slots, LUD placeholders). Depth offsets, the
attention mask and each segment's slice are derived here once, so a method never re-derives
them by offset arithmetic.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np

from jaxspec.verify import TreeSpec


@dataclasses.dataclass(frozen=True)
class Segment:
  """`depth[i]`: position offset of token i after the pending token; `mask[i][j]`: token i attends
  to token j of the same segment. Every segment token also attends to the pending token (the
  tree root) and to the row's committed prefix, never to the tree's drafts or other segments."""

  name: str
  depth: tuple[int, ...]
  mask: tuple[tuple[bool, ...], ...]

  def __post_init__(self):
    n = len(self.depth)
    if len(self.mask) != n or any(len(r) != n for r in self.mask):
      raise ValueError(f"segment {self.name!r}: mask must be [{n}, {n}]")

  @staticmethod
  def of(name: str, depth_N, mask_NxN) -> "Segment":
    return Segment(name, tuple(int(d) for d in np.asarray(depth_N)),
                   tuple(tuple(bool(x) for x in row) for row in np.asarray(mask_NxN)))


@dataclasses.dataclass(frozen=True)
class ForwardLayout:
  """Hashable (a jit static argument through its method)."""

  tree: TreeSpec
  segments: tuple[Segment, ...] = ()

  @property
  def size(self) -> int:
    return self.tree.size + sum(len(s.depth) for s in self.segments)

  def slice(self, name: str) -> slice:
    """Forward positions of segment `name` (use on tokens [B, T] and logits [B, T, V])."""
    start = self.tree.size
    for s in self.segments:
      if s.name == name:
        return slice(start, start + len(s.depth))
      start += len(s.depth)
    raise KeyError(f"no segment {name!r}; segments: {[s.name for s in self.segments]}")

  @cached_property
  def depth(self) -> np.ndarray:
    """[T] position offset of every forward token after the pending token."""
    return np.concatenate([self.tree.depth] + [np.asarray(s.depth, np.int32) for s in self.segments]).astype(np.int32)

  @cached_property
  def mask(self) -> np.ndarray:
    """[T, T] who attends to whom among the forward tokens."""
    m = np.zeros((self.size, self.size), bool)
    Tt = self.tree.size
    m[:Tt, :Tt] = self.tree.mask
    for s in self.segments:
      sl = self.slice(s.name)
      m[sl, sl] = np.asarray(s.mask, bool)
      m[sl, 0] = True
    return m
