"""ntk_analysis.linear_model: the learner linearised at an anchor equals the real learner there,
equals phi(p0) + J(p0)(p - p0) from a dense Jacobian elsewhere, and trains through the
learner's own step with the same dropout masks; one learner serves every anchor (it travels in
the state) with one compile."""
import jax
import jax.flatten_util  # noqa: F401  (jax.flatten_util.ravel_pytree)
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_analysis import linear_model
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import sharding
from ntkcl_jax.configs import base
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit


def _config():
  c = base.get_config()
  c.model.name, c.model.image_size = "tiny", 16
  c.model.overrides.update(dict(patch_size=4, num_layers=2, hidden_size=32, num_heads=2,
                                mlp_dim=64))
  c.data.num_classes, c.data.init_cls, c.data.increment = 6, 2, 2
  c.optim.update(dict(epochs=1, batch_size=4, eval_batch_size=4, lr=0.05))
  return c


def _setup():
  cfg = _config()
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  backbone = vit.init_params(ntkcl.vit_config(cfg), jax.random.PRNGKey(0))
  real = learner_lib.Learner(cfg, backbone, mesh)
  state = real.start_task(real.init_state(jax.random.PRNGKey(1)))
  # move the anchor off the zero-initialised up-projections, so every group has a Jacobian
  leaves, tree = jax.tree_util.tree_flatten(real.trainable(state))
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  anchor = jax.tree_util.tree_unflatten(
      tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  lin = linear_model.LinearisedLearner(cfg, backbone, mesh)
  images = jax.random.uniform(jax.random.PRNGKey(3), (4, 16, 16, 3))
  return real, lin, state, anchor, images


def test_linearised_features_are_the_first_order_taylor_expansion():
  real, lin, state, anchor, images = _setup()
  frozen = state["frozen"]
  lin_frozen = lin.anchored(state, anchor)["frozen"]
  at_anchor = lin.features(lin.backbone, anchor, lin_frozen, images)
  want = real.features(real.backbone, anchor, frozen, images)
  for k in ("channel", "patch", "fused"):
    np.testing.assert_allclose(at_anchor[k], want[k], rtol=1e-6, atol=1e-6)
  flat0, unravel = jax.flatten_util.ravel_pytree(anchor)
  delta = 1e-2 * jax.random.normal(jax.random.PRNGKey(4), flat0.shape)
  phi = lambda u: real.features(real.backbone, unravel(u), frozen, images)["fused"]  # noqa: E731
  jac = jax.jacrev(phi)(flat0)  # (B, D, P): a dense Jacobian, not a JVP
  taylor = phi(flat0) + jnp.einsum("bdp,p->bd", jac, delta)
  got = lin.features(lin.backbone, unravel(flat0 + delta), lin_frozen, images)["fused"]
  np.testing.assert_allclose(got, taylor, rtol=1e-4, atol=1e-5)
  # and it is not the real model there (the expansion is only first order)
  assert float(jnp.max(jnp.abs(got - phi(flat0 + delta)))) > 1e-6


def test_a_linearised_step_runs_through_the_learners_own_code_at_any_anchor():
  """At its anchor the linearised step is the real step (same loss, same update); the same
  learner, without a new compile, serves a second anchor; a state without one is refused."""
  real, lin, state, anchor, images = _setup()
  batch = {"image": np.asarray(images * 255, np.uint8), "label": np.array([0, 1, 0, 1], np.int32),
           "mask": np.ones(4, bool)}
  for scale in (1.0, 1.5):
    at = jax.tree_util.tree_map(lambda a, s=scale: s * a, anchor)
    st = dict(state, params=dict(state["params"], **at))
    fresh = jax.tree_util.tree_map(jnp.copy, st)  # the step donates its input
    s_lin, means = lin.train_step(lin.anchored(fresh), batch, 0, [0, 1], log=True)
    s_real, means_real = real.train_step(jax.tree_util.tree_map(jnp.copy, st), batch, 0, [0, 1],
                                         log=True)
    # at the anchor both models give the same loss (same dropout masks from the same key) ...
    np.testing.assert_allclose(float(means["loss"]), float(means_real["loss"]), rtol=1e-5)
    # ... and the same first step: the linear model's gradient at its anchor is the real one's
    for a, b in zip(jax.tree_util.tree_leaves(s_lin["params"]),
                    jax.tree_util.tree_leaves(s_real["params"])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the anchor rides along unchanged
    for a, b in zip(jax.tree_util.tree_leaves(s_lin["frozen"][linear_model.ANCHOR]),
                    jax.tree_util.tree_leaves(at)):
      np.testing.assert_array_equal(a, b)
  assert lin._step._cache_size() == 1  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="anchored"):
    lin.features(lin.backbone, anchor, state["frozen"], images)
