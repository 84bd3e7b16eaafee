"""Pay per draft: pick each step's draft size by expected tokens per second.

A method whose draft is a chain or tree may verify any prefix of its node list (nodes are
ordered parents first, most probable first, so every prefix is a tree) and runs one of a few
forward sizes (`prefix_sizes`; 1 = no draft). For a prefix of n nodes:

    expected tokens/s(n) = (1 + E_n(g)) / time(n)

`E_n(g)` is the expected number of accepted drafts when the first n nodes are verified and each
node's prior acceptance (given its parent was accepted) is scaled by g. The scale g is learned
online per generation and per draft context (e.g. how long an n-gram matched for prompt
lookup): the g whose predictions best fit the accepted counts seen so far in that context
(squared error, exponentially forgotten, plus a fixed pull towards g = 1, so a generation that
stops drafting returns to the prior and tries again). Each row picks its own size; the step runs
the largest any row needs. `time` is the device's measured forward
time relative to one token (`jaxspec.profiling.forward_time_curve`). PPD picks its tree the same
way. The choice changes only how many nodes are verified, never which are accepted: outputs
stay those of the verifier (lossless).

A bound on the loss (`max_loss`; a conservative bandit, Wu et al. 2016): a row may run a size
only if, were every draft rejected, its generation would still have spent at most
(1 + max_loss) times the forwards AR needs for the tokens it has (`SizingStats.ahead_B`, in
1-token forwards, from the measured `time`). A generation whose drafts keep failing, e.g. a
short answer the sizing has not learned yet, falls at most max_loss behind AR in forward time;
one whose drafts were accepted has earned room to explore. The price is a slower start: the
first draft waits until the steps before it have earned its cost (experiments/LOG.md,
session 15: `auto` 1.14x AR with the bound, worst prompt 0.95x; 1.18x without, worst 0.88x).
Crediting half a draft's expected acceptance before it is seen measured worse on both counts.
The size 1 (no draft) is always allowed.
"""

from __future__ import annotations

from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.errors import InvalidOptionError

SCALES = np.linspace(0.1, 2.0, 39)  # the grid of acceptance scales g
PRIOR_WEIGHT = 1.0  # pseudo-observations at g = 1 (not forgotten)
MAX_LOSS = 0.05  # `auto`'s bound: at most 5% more forward time than AR (other methods: none by default)
DECAY = 0.97  # per step: ~33 steps of memory
MAX_ACCEPT = 0.97


def prefix_sizes(num_nodes: int, want: int = 3) -> tuple[int, ...]:
  """Up to `want` forward sizes: 1 (no draft), the whole draft and evenly spaced ones between."""
  return tuple(sorted({int(round(1 + (num_nodes - 1) * i / (want - 1))) for i in range(want)}))


def parse_sizes(sizes) -> tuple[int, ...]:
  """(1, 3, 6) or "1/3/6" -> (1, 3, 6)."""
  if isinstance(sizes, str):
    try:
      sizes = [int(x) for x in sizes.split("/")]
    except ValueError:
      raise InvalidOptionError(f"sizes must look like 1/3/6, got {sizes!r}") from None
  return tuple(int(x) for x in (sizes if isinstance(sizes, (tuple, list)) else (sizes,)))


def expected_table(parents, node_accept) -> np.ndarray:
  """[T + 1, G] E_n(g): expected accepted drafts verifying the first n nodes (n = 0..T; n <= 1:
  none) when node i is accepted with probability min(MAX_ACCEPT, g * node_accept[i]) given its
  parent was. Static per method configuration."""
  T = len(parents)
  a = np.minimum(MAX_ACCEPT, np.asarray(node_accept, np.float64)[None, :] * SCALES[:, None])  # [G, T]
  reach = np.ones_like(a)
  for i in range(1, T):
    reach[:, i] = reach[:, parents[i]] * a[:, i]
  reach[:, 0] = 0.0  # the root is the pending token, not a draft
  return np.concatenate([np.zeros((1, len(SCALES))), np.cumsum(reach.T, axis=0)]).astype(np.float32)


def draft_need(valid_BxT: jax.Array) -> jax.Array:
  """Scalar: forward tokens the batch's draft needs (last valid node of any row, plus one)."""
  T = valid_BxT.shape[1]
  last_B = jnp.max(jnp.where(valid_BxT, jnp.arange(T, dtype=jnp.int32)[None, :], 0), axis=1)
  return jnp.max(last_B) + 1


def size_index(sizes: tuple[int, ...], valid_BxT: jax.Array) -> jax.Array:
  """Scalar int32: index into `sizes` of the smallest forward size that holds the batch's draft."""
  return jnp.searchsorted(jnp.asarray(sizes, jnp.int32), draft_need(valid_BxT)).astype(jnp.int32)


@struct.dataclass
class SizingStats:
  err_CxG: jax.Array  # [contexts, G] float32: forgotten squared error of each scale's predictions
  ahead_B: jax.Array  # [B] float32: (1 + max_loss) x tokens - forwards spent (inf: unbounded)
  max_loss: jax.Array  # [] float32


def check_max_loss(name: str, max_loss) -> None:
  if max_loss is not None and not (isinstance(max_loss, (int, float)) and not isinstance(max_loss, bool)
                                   and max_loss >= 0):
    raise InvalidOptionError(f"{name}: max_loss must be >= 0 (a fraction of AR's time, e.g. 0.05) or None "
                             f"(no bound), got {max_loss!r}")


def init_stats(contexts: int = 1, batch_size: int = 1, max_loss: float | None = None) -> SizingStats:
  """Fresh statistics for a generation; `max_loss` None: no bound. The prefill's token counts as
  one forward."""
  check_max_loss("init_stats", max_loss)
  loss = np.float32(0.0 if max_loss is None else max_loss)
  ahead = np.inf if max_loss is None else loss
  return SizingStats(err_CxG=jnp.zeros((contexts, len(SCALES)), jnp.float32),
                     ahead_B=jnp.full((batch_size,), ahead, jnp.float32), max_loss=jnp.asarray(loss))


def spend(stats: SizingStats, sizes: tuple[int, ...], cost, valid_BxT, context_B, committed_B,
          active_B) -> SizingStats:
  """Fold one step's cost into the loss bound: every active row paid the step's forward size
  (the one that held the batch's draft; `cost` as in `best_sizes`) and committed `committed_B`
  tokens."""
  cost_CxS = jnp.asarray(np.atleast_2d(np.asarray(cost, np.float32)))
  context_B = jnp.zeros(valid_BxT.shape[:1], jnp.int32) if context_B is None else context_B
  time_B = cost_CxS[jnp.minimum(context_B, cost_CxS.shape[0] - 1), size_index(sizes, valid_BxT)]
  gained_B = (1.0 + stats.max_loss) * committed_B.astype(jnp.float32) - time_B
  return stats.replace(ahead_B=stats.ahead_B + jnp.where(active_B, gained_B, 0.0))


def _per_context(table) -> np.ndarray:
  """A table as [C, T + 1, G]: one [T + 1, G] table serves every context."""
  table = np.asarray(table)
  return table[None] if table.ndim == 2 else table


@struct.dataclass
class RowTables:
  """Expected tables computed at run time, one per row (a draft tree chosen per step from its
  drafts' confidence): E_n(g) as `expected_table`'s, [B, T + 1, G]."""
  E_BxTxG: jax.Array


def row_tables(parents_BxT: jax.Array, accept_BxT: jax.Array, max_depth: int) -> RowTables:
  """`expected_table` of each row's own tree: node i accepted with probability
  min(MAX_ACCEPT, g * accept[b, i]) given its parent was (parents[b, i] < i; the root's unused)."""
  B, T = parents_BxT.shape
  parents = jnp.maximum(parents_BxT, 0).astype(jnp.int32)
  a_BxGxT = jnp.minimum(MAX_ACCEPT, accept_BxT[:, None, :] * jnp.asarray(SCALES, jnp.float32)[None, :, None])
  not_root = jnp.arange(T)[None, None, :] > 0
  reach = jnp.where(not_root, a_BxGxT, 1.0)
  for _ in range(max_depth):  # reach[i] = a[i] * reach[parent i]: a fixed point after max_depth rounds
    reach = jnp.where(not_root, a_BxGxT * jnp.take_along_axis(reach, jnp.broadcast_to(parents[:, None, :], reach.shape),
                                                               axis=2), 1.0)
  reach = jnp.where(not_root, reach, 0.0)  # the root is the pending token, not a draft
  cum_BxTxG = jnp.cumsum(jnp.swapaxes(reach, 1, 2), axis=1)
  return RowTables(jnp.concatenate([jnp.zeros((B, 1, len(SCALES)), jnp.float32), cum_BxTxG], axis=1))


def _row_table(table, context_B) -> jax.Array:
  """[B, T + 1, G]: each row's table (a static table by the row's context, or `RowTables`)."""
  if isinstance(table, RowTables):
    return table.E_BxTxG
  table_CxTxG = jnp.asarray(_per_context(table))
  return table_CxTxG[jnp.minimum(context_B, table_CxTxG.shape[0] - 1)]


def _scale_index(stats: SizingStats, table_BxTxG, context_B) -> jax.Array:
  """[B] each row's best-fitting scale: its context's error plus a pull towards g = 1."""
  full_BxG = table_BxTxG[:, -1]
  prior_BxG = PRIOR_WEIGHT * (full_BxG - full_BxG[:, int(np.argmin(np.abs(SCALES - 1.0)))][:, None]) ** 2
  return jnp.argmin(stats.err_CxG[context_B] + prior_BxG, axis=1)


def observe(stats: SizingStats, table, verified_B, accepted_B, active_B, context_B=None) -> SizingStats:
  """Fold in one step: row b (in draft context `context[b]`, default 0) verified the first
  `verified[b]` nodes and accepted `accepted[b]` drafts. `table`: one `expected_table` for every
  context, [C, T + 1, G] one per context (contexts whose drafts differ, e.g. grafted chains), or
  `RowTables` (each row's tree of this step)."""
  context_B = jnp.zeros_like(verified_B) if context_B is None else context_B
  table_BxTxG = _row_table(table, context_B)
  predicted_BxG = jnp.take_along_axis(table_BxTxG, verified_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  err_BxG = ((accepted_B[:, None] - predicted_BxG) ** 2) * active_B[:, None]
  return stats.replace(err_CxG=(stats.err_CxG * DECAY).at[context_B].add(err_BxG))


def best_sizes(stats: SizingStats, table, sizes: tuple[int, ...], cost, context_B) -> jax.Array:
  """[B]: each row's forward size (one of `sizes`) with the highest expected tokens per second
  under its context's learned scale. `table` as in `observe`. `cost[i]`: time of a step of
  sizes[i] tokens relative to a 1-token forward; or `cost[c][i]` per draft context (a step's
  drafting work may differ by context)."""
  table_BxTxG = _row_table(table, context_B)
  g_B = _scale_index(stats, table_BxTxG, context_B)
  expected_BxS = table_BxTxG[jnp.arange(table_BxTxG.shape[0])[:, None], jnp.asarray(sizes)[None, :], g_B[:, None]]
  cost_CxS = np.atleast_2d(np.asarray(cost, np.float32))
  cost_BxS = jnp.asarray(cost_CxS)[jnp.minimum(context_B, cost_CxS.shape[0] - 1)]
  rate_BxS = (1.0 + expected_BxS) / cost_BxS
  # the loss bound: sizes that, all drafts rejected, keep the row within (1 + max_loss) x AR
  room_B = jnp.broadcast_to(stats.ahead_B, context_B.shape) + 1.0 + stats.max_loss
  allowed_BxS = (cost_BxS <= room_B[:, None]) | (jnp.arange(len(sizes)) == 0)[None, :]
  return jnp.asarray(sizes, jnp.int32)[jnp.argmax(jnp.where(allowed_BxS, rate_BxS, -jnp.inf), axis=1)]


def measured_cost(bundle, sizes: tuple[int, ...]) -> tuple[float, ...]:
  """Forward time of each size relative to one token, measured on this device (cached)."""
  from jaxspec.profiling import forward_time_curve
  curve = forward_time_curve(bundle, (1,) + tuple(sizes))
  return tuple(curve[s] / curve[1] for s in sizes)


class PrefixSizing:
  """Mixin for a tree drafter whose node list is ordered most probable first: `forward_sizes`
  are `sizes` or `prefix_sizes` of its tree (when `adaptive` and the tree has more than one
  draft), and `limit`/`observe` apply the learned choice within the loss bound. The class
  provides `adaptive`, `sizes`, `cost`, `max_loss`, `tree` and `node_prior()` (per node:
  acceptance given the parent was accepted, the root's unused), or `context_priors()` (one such
  list per draft context, `Draft.context` saying each row's)."""

  def _normalise_sizes(self) -> None:
    """`sizes` as a sorted tuple (hashable, and "1/2/4" equals (1, 2, 4)); call from __post_init__."""
    if self.sizes is not None:
      object.__setattr__(self, "sizes", tuple(sorted(set(parse_sizes(self.sizes)))))

  @property
  def sized(self) -> bool:
    return self.adaptive and self.tree.size > 2

  @property
  def forward_sizes(self) -> tuple[int, ...]:
    """`sizes` when given (e.g. "1/2/4/7"), else `prefix_sizes` of the tree; its size when not sized."""
    if not self.sized:
      return (self.tree.size,)
    if self.sizes is None:
      return prefix_sizes(self.tree.size)
    sizes = self.sizes
    if sizes[0] != 1 or sizes[-1] != self.tree.size:
      raise InvalidOptionError(f"{self.name} sizes must start at 1 (no draft) and end at the tree's "
                               f"{self.tree.size} nodes, got {self.sizes!r}")
    return sizes

  def context_priors(self) -> list[list[float]]:
    return [self.node_prior()]

  @property
  def step_cost(self):
    """Time of a step per forward size relative to a 1-token forward: `cost` (the forward alone),
    or one such list per draft context for a drafter whose drafting work is not free."""
    return self.cost

  @cached_property
  def size_table(self) -> np.ndarray:
    """[T + 1, G] (one context) or [C, T + 1, G]."""
    tables = [expected_table(self.tree.parents, p) for p in self.context_priors()]
    return tables[0] if len(tables) == 1 else np.stack(tables)

  def limit(self, valid_BxT, stats: SizingStats, context_B=None, table=None):
    """valid_BxT cut to each row's paying prefix (unchanged when not sized). `table`: the rows'
    own `RowTables` (trees chosen per step), else the method's static `size_table`."""
    if not self.sized:
      return valid_BxT
    if self.cost is None:
      raise InvalidOptionError(f"{self.name}: adaptive sizes need `cost`; resolve the method against a model "
                               "first (generate does this)")
    B, T = valid_BxT.shape
    context_B = jnp.zeros((B,), jnp.int32) if context_B is None else context_B
    table = self.size_table if table is None else table
    size_B = best_sizes(stats, table, self.forward_sizes, self.step_cost, context_B)
    return valid_BxT & (jnp.arange(T)[None, :] < size_B[:, None])

  def observe_step(self, stats: SizingStats, draft, verdict, n_B) -> SizingStats:
    if not self.sized:
      return stats
    # a sized drafter's Draft.context is its rows' draft context ([B] int32) or None
    table = self.size_table if draft.parents is None else row_tables(draft.parents, draft.accept, self.tree.max_depth)
    stats = observe(stats, table, draft.valid.sum(axis=1), verdict.n - 1, n_B > 0, draft.context)
    return spend(stats, self.forward_sizes, self.step_cost, draft.valid, draft.context, n_B, n_B > 0)
