"""Class order and task splits against the official code's numpy draw (docs/method.md §3.2)."""
import numpy as np
import pytest

from ntkcl_jax.data import protocol


@pytest.mark.parametrize("num_classes", [8, 10, 37, 100, 200, 345])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_class_order_equals_official_numpy_draw(seed, num_classes):
  # The official main loop: np.random.seed(seed); order = np.random.permutation(C) (global state).
  np.random.seed(seed)
  want = np.random.permutation(num_classes)
  np.testing.assert_array_equal(protocol.class_order(num_classes, "seed", seed), want)


def test_class_order_seed0_matches_spec_listing():
  # First classes listed in docs/method.md §3.2 (taken from the official runs).
  assert protocol.class_order(100, "seed", 0)[:10].tolist() == [26, 86, 2, 55, 75, 93, 16, 73,
                                                                54, 95]
  assert protocol.class_order(200, "seed", 0)[:10].tolist() == [18, 170, 107, 98, 177, 182, 5,
                                                                146, 12, 152]


def test_natural_and_explicit_orders():
  np.testing.assert_array_equal(protocol.class_order(5, "natural"), np.arange(5))
  np.testing.assert_array_equal(protocol.class_order(4, "explicit", explicit=(3, 1, 0, 2)),
                                [3, 1, 0, 2])
  with pytest.raises(ValueError, match="permutation of 0..3"):
    protocol.class_order(4, "explicit", explicit=(0, 1, 1, 2))
  with pytest.raises(ValueError, match="'seed', 'natural' or 'explicit'"):
    protocol.class_order(4, "random")


@pytest.mark.parametrize("c,init,inc,sizes", [
    (100, 10, 10, [10] * 10),
    (37, 7, 5, [7, 5, 5, 5, 5, 5, 5]),      # Oxford Pets: 7 tasks
    (345, 23, 23, [23] * 15),                # DomainNet
    (10, 3, 4, [3, 4, 3]),                   # remainder task
    (10, 10, 5, [10]),                       # everything in the first task
    (11, 2, 3, [2, 3, 3, 3]),
])
def test_task_splits_sizes_cover_and_order(c, init, inc, sizes):
  tasks = protocol.task_splits(c, init, inc)
  assert [len(t) for t in tasks] == sizes
  # New labels are consecutive: task k holds the next len(t) positions of the class order.
  assert sum(tasks, []) == list(range(c))


@pytest.mark.parametrize("c,init,inc", [(10, 0, 2), (10, 2, 0), (10, 11, 2), (0, 1, 1)])
def test_task_splits_reject_impossible(c, init, inc):
  with pytest.raises(ValueError, match="impossible split"):
    protocol.task_splits(c, init, inc)


def test_remap_is_position_in_order():
  order = protocol.class_order(50, "seed", 3)
  labels = np.random.RandomState(0).randint(0, 50, 200)
  new = protocol.remap(labels, order)
  # Independent expectation: list.index of each label.
  assert new.tolist() == [order.tolist().index(l) for l in labels]
  np.testing.assert_array_equal(order[new], labels)
