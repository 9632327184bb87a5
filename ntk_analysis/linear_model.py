"""The NTK-CL learner with its model linearised around one checkpoint: the features become their
first-order Taylor expansion in the trainable PEFT parameters, phi(p0) + J(p0)(p - p0) (Lee et al.
2019), and everything else is the learner's own code. Trained from theta_t^0 over a task's real
minibatches (same images, augmentation, order, loss terms, dropout masks, optimiser and learning
rates), it is the linearised run that experiment (d) sets against the real one
(docs/ntk_theory.md §4).

    lin = LinearisedLearner(config, backbone, mesh, anchor=learner.trainable(start_state))
    state = lin.train_step(state, batch, epoch, classes)     # as Learner.train_step
"""
from __future__ import annotations

import jax

from ntkcl_jax import learner as learner_lib


class LinearisedLearner(learner_lib.Learner):
  """A Learner whose `features` are linear in the trainable tree around `anchor` (a trainable
  tree, e.g. the task's start). Build one per anchor: its jitted pieces close over it."""

  def __init__(self, config, backbone_params, mesh, anchor):
    self.anchor = jax.tree_util.tree_map(jax.numpy.asarray, anchor)
    super().__init__(config, backbone_params, mesh)

  def features(self, backbone, trainable, frozen, images, *, train: bool = False, rng=None):
    """phi(anchor) + J(anchor)(trainable - anchor), with the same dropout masks (rng) in both."""
    def phi(p):
      return learner_lib.Learner.features(self, backbone, p, frozen, images, train=train, rng=rng)
    delta = jax.tree_util.tree_map(lambda p, a: p - a, trainable, self.anchor)
    value, tangent = jax.jvp(phi, (self.anchor,), (delta,))
    return jax.tree_util.tree_map(lambda v, t: v + t, value, tangent)
