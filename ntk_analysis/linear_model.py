"""The NTK-CL learner with its model linearised around one checkpoint: the features become their
first-order Taylor expansion in the trainable PEFT parameters, phi(p0) + J(p0)(p - p0) (Lee et al.
2019), and everything else is the learner's own code. Trained from theta_t^0 over a task's real
minibatches (same images, augmentation, order, loss terms, dropout masks, optimiser and learning
rates), it is the linearised run that experiment (d) sets against the real one
(docs/ntk_theory.md §4).

The anchor p0 travels in the state (state["frozen"][ANCHOR]), not in the learner, so one learner
(one compile of each jitted piece) serves every task's anchor.

    lin = LinearisedLearner(config, backbone, mesh)
    state = lin.anchored(start_state)                        # linearised at its own parameters
    state = lin.train_step(state, batch, epoch, classes)     # as Learner.train_step
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ntkcl_jax import learner as learner_lib

ANCHOR = "linearised_at"  # the state["frozen"] entry holding p0


class LinearisedLearner(learner_lib.Learner):
  """A Learner whose `features` are linear in the trainable tree around the anchor its state
  carries (`anchored`)."""

  @staticmethod
  def anchored(state, anchor=None):
    """`state` linearised at `anchor` (default: its own trainable tree), copied so that the
    donated training state never holds one buffer twice."""
    anchor = learner_lib.Learner.trainable(state) if anchor is None else anchor
    anchor = jax.tree_util.tree_map(jnp.array, anchor)  # jnp.array copies
    return dict(state, frozen=dict(state["frozen"], **{ANCHOR: anchor}))

  def features(self, backbone, trainable, frozen, images, *, train: bool = False, rng=None):
    """phi(anchor) + J(anchor)(trainable - anchor), with the same dropout masks (rng) in both."""
    if ANCHOR not in frozen:
      raise ValueError("this state has no anchor to linearise at: pass "
                       "LinearisedLearner.anchored(state)")
    frozen = dict(frozen)
    anchor = frozen.pop(ANCHOR)

    def phi(p):
      return learner_lib.Learner.features(self, backbone, p, frozen, images, train=train, rng=rng)
    delta = jax.tree_util.tree_map(lambda p, a: p - a, trainable, anchor)
    value, tangent = jax.jvp(phi, (anchor,), (delta,))
    return jax.tree_util.tree_map(lambda v, t: v + t, value, tangent)
