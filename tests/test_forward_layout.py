"""methods.forward_layout: depth, mask and slices of a forward made of a tree and named segments."""

import numpy as np
import pytest

from jaxspec.methods.forward_layout import ForwardLayout, Segment
from jaxspec.verify import TreeSpec


def test_segments_follow_the_tree_and_see_the_root_and_themselves_only():
  tree = TreeSpec((-1, 0, 0, 1))  # root, two children, a grandchild
  seg_a = Segment.of("a", [1, 2], np.tril(np.ones((2, 2), bool)))
  seg_b = Segment.of("b", [5], np.ones((1, 1), bool))
  lay = ForwardLayout(tree, (seg_a, seg_b))
  assert lay.size == 7 and lay.slice("a") == slice(4, 6) and lay.slice("b") == slice(6, 7)
  assert lay.depth.tolist() == [0, 1, 1, 2, 1, 2, 5]
  m = lay.mask
  np.testing.assert_array_equal(m[:4, :4], tree.mask)
  assert set(np.nonzero(m[5])[0]) == {0, 4, 5} and set(np.nonzero(m[6])[0]) == {0, 6}
  assert not m[:4, 4:].any()  # the tree never sees a segment
  with pytest.raises(KeyError, match="segments"):
    lay.slice("c")


def test_plain_tree_layout_is_the_tree():
  tree = TreeSpec.chain(3)
  lay = ForwardLayout(tree)
  np.testing.assert_array_equal(lay.mask, tree.mask)
  assert lay.depth.tolist() == [0, 1, 2, 3]
