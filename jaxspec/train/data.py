"""Batches as a pure function of the step: resuming at step s reads exactly the batches an
uninterrupted run would have read from step s on (the data position is the step)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ArrayDataset:
  """Equal-length arrays, one example per row (`arrays[name]: [N, ...]`)."""

  arrays: dict[str, np.ndarray]

  def __post_init__(self):
    sizes = {len(v) for v in self.arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"dataset arrays differ in length: { {k: len(v) for k, v in self.arrays.items()} }")

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def batch(self, step: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch number `step`: epoch e = step * batch_size // N walks a permutation seeded by
    (seed, e); the last partial batch of an epoch wraps into the next epoch's order."""
    n = len(self)
    start = step * batch_size
    idx = [self._order(seed, (start + i) // n)[(start + i) % n] for i in range(batch_size)]
    return {k: v[idx] for k, v in self.arrays.items()}

  def _order(self, seed: int, epoch: int) -> np.ndarray:
    cache = self.__dict__.setdefault("_orders", {})
    if (seed, epoch) not in cache:
      if len(cache) > 4:
        cache.clear()
      cache[(seed, epoch)] = np.random.default_rng([seed, epoch]).permutation(len(self))
    return cache[(seed, epoch)]

  def split(self, eval_fraction: float, seed: int = 0, groups=None) -> tuple["ArrayDataset", "ArrayDataset"]:
    """(train, eval) by a fixed random split of the rows; with `groups` (one label per row, e.g.
    the prompt a sequence continues) whole groups go to one side (see `held_out_groups`)."""
    pick = lambda rows: ArrayDataset({k: v[np.sort(rows)] for k, v in self.arrays.items()})
    if groups is not None:
      is_eval = held_out_groups(groups, eval_fraction, seed)
      return pick(np.nonzero(~is_eval)[0]), pick(np.nonzero(is_eval)[0])
    order = np.random.default_rng([seed, 10**6]).permutation(len(self))
    n_eval = max(1, int(round(len(self) * eval_fraction)))
    return pick(order[n_eval:]), pick(order[:n_eval])

  def batches(self, batch_size: int):
    """Every row once, in order, in batches (the last one short): for evaluation."""
    for s in range(0, len(self), batch_size):
      yield {k: v[s:s + batch_size] for k, v in self.arrays.items()}


def held_out_groups(groups, eval_fraction: float, seed: int = 0) -> np.ndarray:
  """[N] bool: the rows whose group is among a fixed random `eval_fraction` of the groups (at
  least one), so no group is on both sides of a split."""
  labels = np.asarray([str(g) for g in groups])
  unique = np.unique(labels)
  n_eval = max(1, int(round(len(unique) * eval_fraction)))
  chosen = unique[np.random.default_rng([seed, 10**6 + 1]).permutation(len(unique))[:n_eval]]
  return np.isin(labels, chosen)
