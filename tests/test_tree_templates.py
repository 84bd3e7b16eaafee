"""Token Recycling's static tree templates and the `auto` template choice (on fake forward-time
curves: the choice follows the device's cost, not a constant)."""

import dataclasses
from collections import Counter

import pytest

from jaxspec.methods import auto_template, tree_templates
from jaxspec.profiling import CURVE_KEY, curve_key


def _depth_counts(tree):
  return [n for _, n in sorted(Counter(int(d) for d in tree.depth[1:]).items())]


def test_xl_is_the_papers_80_node_tree():
  tree, slots = tree_templates.template("xl")
  assert tree.size == 81 and _depth_counts(tree) == [8, 21, 25, 15, 8, 3]
  assert slots[0] == -1 and all(0 <= s < 8 for s in slots[1:])


@pytest.mark.parametrize("name,size", sorted(tree_templates.TEMPLATE_SIZES.items()))
def test_named_templates_are_trees_of_their_size_closed_under_prefixes(name, size):
  tree, slots = tree_templates.template(name)
  assert tree.size == size + 1
  seen = set()
  for i, (p, s) in enumerate(zip(tree.parents[1:], slots[1:]), start=1):
    assert 0 <= p < i  # parents come first: every prefix of a kept path is kept
    assert (p, s) not in seen  # one node per (parent, candidate slot)
    seen.add((p, s))
  # the most probable paths: the top candidate of the root is always there, at depth 1
  assert (0, 0) in seen


def test_expected_accepted_matches_hand_computation():
  tree, slots = tree_templates.best_paths_template(3, slot_accept=(0.5, 0.2))
  # nodes: slot 0 at depth 1 (0.5), then slot 0 of it (0.25), then slot 1 of the root (0.2)
  assert tree_templates.expected_accepted(tree, slots, (0.5, 0.2)) == pytest.approx(0.5 + 0.25 + 0.2)


@pytest.mark.parametrize("depth", [2, 3, 6])
def test_main_chain_first_puts_the_slot0_path_first_and_keeps_the_tree(depth):
  tree, slots = tree_templates.template("small")
  new, new_slots = tree_templates.main_chain_first(tree, slots, depth)
  for d in range(1, depth + 1):  # node d: the slot-0 child of node d - 1
    assert new.parents[d] == d - 1 and new_slots[d] == 0
  assert all(0 <= p < i for i, p in enumerate(new.parents[1:], start=1))  # parents still first
  old_paths = {_path(tree, slots, i) for i in range(tree.size)}
  new_paths = {_path(new, new_slots, i) for i in range(new.size)}
  assert old_paths <= new_paths and len(new_paths) == new.size  # nothing lost, no duplicate node
  assert new.size == tree.size + max(0, depth - 3)  # small's main path reaches depth 3


def _path(tree, slots, i):
  """The slots from the root to node i."""
  out = []
  while i > 0:
    out.append(slots[i])
    i = tree.parents[i]
  return tuple(reversed(out))


def _with_curve(bundle, time_of_size):
  sizes = {tree_templates.template(n)[0].size for n in auto_template.CANDIDATES}
  curve = {s: time_of_size(s) for s in sizes}
  return dataclasses.replace(bundle, method_memory={CURVE_KEY: {curve_key(bundle, 128): curve}})


def test_auto_picks_the_largest_tree_on_a_flat_curve_and_the_smallest_on_a_steep_one(tiny):
  assert auto_template.pick_template(_with_curve(tiny, lambda s: 0.01), k=8) == "xl"  # accelerator-like
  assert auto_template.pick_template(_with_curve(tiny, lambda s: 0.01 * s), k=8) == "tiny"  # cost per token
