"""Static draft-tree templates for adjacency-matrix drafters (Token Recycling).

A template node is (parent, child slot c): its token is candidate c of its parent's token. We
build a template of N nodes by taking the N most probable paths under a prior acceptance
probability per child slot (a Medusa-style sparse tree: every prefix of a kept path is kept).
"""

from __future__ import annotations

import heapq

import numpy as np

from jaxspec.verify import TreeSpec

# Prior probability that candidate slot c is the accepted continuation (roughly what Token
# Recycling reports: the top candidate dominates, then a long tail).
PRIOR_SLOT_ACCEPT = (0.45, 0.15, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015)

# Named sizes (drafted nodes, root excluded); "xl" follows the reference's per-depth counts.
TEMPLATE_SIZES = {"tiny": 4, "small": 8, "medium": 16, "large": 32, "xxl": 64}
REFERENCE_DEPTH_COUNTS = (8, 21, 25, 15, 8, 3)  # the paper's 80-node template


def best_paths_template(num_nodes: int, slot_accept=PRIOR_SLOT_ACCEPT, max_depth: int = 8,
                        depth_counts: tuple[int, ...] | None = None,
                        deeper_accept=None) -> tuple[TreeSpec, tuple[int, ...]]:
  """(tree, slot per node) with the `num_nodes` most probable paths. Node 0 is the root (slot -1).

  depth_counts, if given, caps how many nodes each depth may hold (sum must be num_nodes).
  deeper_accept, if given, is the slot prior at depths >= 2 (the drafter differs there: e.g.
  trained heads at depth 1 and a recycled matrix below).
  """
  deeper = slot_accept if deeper_accept is None else deeper_accept
  parents, slots, probs, depths = [-1], [-1], [1.0], [0]
  per_depth = {}
  heap = [(-slot_accept[c], 0, c) for c in range(len(slot_accept))]  # (-path prob, parent node, slot)
  heapq.heapify(heap)
  while len(parents) - 1 < num_nodes and heap:
    neg, parent, c = heapq.heappop(heap)
    d = depths[parent] + 1
    if d > max_depth:
      continue
    if depth_counts is not None and per_depth.get(d, 0) >= (depth_counts[d - 1] if d - 1 < len(depth_counts) else 0):
      continue
    node = len(parents)
    parents.append(parent)
    slots.append(c)
    probs.append(-neg)
    depths.append(d)
    per_depth[d] = per_depth.get(d, 0) + 1
    for c2 in range(len(deeper)):
      heapq.heappush(heap, (-(-neg * deeper[c2]), node, c2))
  return TreeSpec(tuple(parents)), tuple(slots)


def template(name_or_size, slot_accept=PRIOR_SLOT_ACCEPT) -> tuple[TreeSpec, tuple[int, ...]]:
  """A named template ("tiny".."xxl", "xl" = the reference 80-node shape) or a node count."""
  if name_or_size == "xl":
    return best_paths_template(sum(REFERENCE_DEPTH_COUNTS), slot_accept, max_depth=len(REFERENCE_DEPTH_COUNTS),
                               depth_counts=REFERENCE_DEPTH_COUNTS)
  n = TEMPLATE_SIZES[name_or_size] if isinstance(name_or_size, str) else int(name_or_size)
  return best_paths_template(n, slot_accept)


def expected_accepted(tree: TreeSpec, slots, slot_accept) -> float:
  """Expected drafted tokens accepted per step under independent per-slot acceptance."""
  p = np.ones(tree.size)
  for i in range(1, tree.size):
    p[i] = p[tree.parents[i]] * slot_accept[slots[i]]
  return float(p[1:].sum())


def main_chain_first(tree: TreeSpec, slots, depth: int) -> tuple[TreeSpec, tuple[int, ...]]:
  """(tree, slots) with its main path (slot 0 at every depth) reaching `depth`, nodes reordered
  root, main path by depth, then the others in their old order (parents still come first).

  A prompt-lookup chain grafted on a template occupies the main path: with it first, every
  prefix that verifies the chain to depth d is 1 + d nodes."""
  parents, old_slots = list(tree.parents), list(slots)
  main, node = [0], 0
  for _ in range(depth):
    child = next((i for i in range(1, len(parents)) if parents[i] == node and old_slots[i] == 0), None)
    if child is None:  # extend the main path past the template's depth
      parents.append(node)
      old_slots.append(0)
      child = len(parents) - 1
    main.append(child)
    node = child
  on_main = set(main)
  order = main + [i for i in range(len(parents)) if i not in on_main]
  new_id = {old: new for new, old in enumerate(order)}
  new_parents = tuple(-1 if parents[i] < 0 else new_id[parents[i]] for i in order)
  return TreeSpec(new_parents), tuple(old_slots[i] for i in order)
