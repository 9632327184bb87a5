import numpy as np
import pytest

from ntkcl_jax import tree_utils


def test_split_then_merge_is_identity_and_overlap_is_refused():
  tree = {"a": {"adapter": {"w": np.ones(2)}, "k": np.zeros(3)}, "b": np.arange(2)}
  yes, no = tree_utils.split(tree, lambda k: "/adapter/" in k)
  assert list(tree_utils.flatten(yes)) == ["a/adapter/w"]
  assert sorted(tree_utils.flatten(no)) == ["a/k", "b"]
  back = tree_utils.flatten(tree_utils.merge(yes, no))
  assert sorted(back) == sorted(tree_utils.flatten(tree))
  with pytest.raises(ValueError, match="a/k"):
    tree_utils.merge(no, {"a": {"k": np.ones(3)}})
