"""template="auto" for Token Recycling: pick the tree that maximises expected tokens per second.

expected tokens/s(template) = (1 + expected accepted drafts) / forward time(template size).
Forward time vs number of tokens is measured once per bundle on this device (cached in
`bundle.method_memory`). Acceptance uses the prior per-slot probabilities scaled by a factor
fitted to what previous calls on this bundle observed (1.0 until something was observed).
On a FLOP-poor CPU the forward cost grows quickly with tokens, so small trees win; on an
accelerator the curve is flat up to hundreds of tokens, so the large trees win.
"""

from __future__ import annotations

import numpy as np

from jaxspec.methods import tree_templates

CANDIDATES = ("tiny", "small", "medium", "large", "xl")
STATS_KEY = "recycling_acceptance"


def _scaled(prior, alpha):
  return tuple(min(0.95, a * alpha) for a in prior)


def fitted_alpha(bundle, k: int) -> float:
  """Scale of the slot-acceptance prior that reproduces the acceptance observed so far."""
  obs = bundle.method_memory.get(STATS_KEY, {})
  if not obs:
    return 1.0
  prior = tree_templates.PRIOR_SLOT_ACCEPT[:k]
  num = den = 0.0
  for name, (mean_acc, steps) in obs.items():
    tree, slots = tree_templates.template(name, prior)
    grid = np.linspace(0.05, 2.5, 50)
    preds = np.array([tree_templates.expected_accepted(tree, slots, _scaled(prior, a)) for a in grid])
    num += steps * grid[int(np.argmin(np.abs(preds - mean_acc)))]
    den += steps
  return num / den if den else 1.0


def record_acceptance(bundle, method, mean_accepted: float, steps: int) -> None:
  if steps <= 0:
    return
  stats = bundle.method_memory.setdefault(STATS_KEY, {})
  old_mean, old_steps = stats.get(method.template, (0.0, 0))
  total = old_steps + steps
  stats[method.template] = ((old_mean * old_steps + mean_accepted * steps) / total, total)


def pick_template(bundle, k: int) -> str:
  from jaxspec.profiling import forward_time_curve
  prior = tree_templates.PRIOR_SLOT_ACCEPT[:k]
  trees = {n: tree_templates.template(n, prior) for n in CANDIDATES}
  sizes = sorted({t.size for t, _ in trees.values()})
  curve = forward_time_curve(bundle, sizes)
  alpha = fitted_alpha(bundle, k)
  best, best_rate = None, -1.0
  for name, (tree, slots) in trees.items():
    rate = (1.0 + tree_templates.expected_accepted(tree, slots, _scaled(prior, alpha))) / curve[tree.size]
    if rate > best_rate:
      best, best_rate = name, rate
  return best
