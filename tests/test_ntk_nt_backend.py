"""neural-tangents as an oracle (docs/ntk_theory.md §5: T7, T12): its analytic stax
kernels, its four empirical implementations, its predict normalisation and nt.batch tiling; and
its empirical kernels of the full NTK-CL readout (both branches, attention fusion, patch prompts,
a frozen set) after real training steps and a task end, against ours and a naive jacrev J J^T.

neural-tangents comes with the `ntk` extra (`bash install.sh ntk`). Without the package these
tests skip; with it installed, any failure to import it through ntk_analysis.nt_compat fails them.
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if importlib.util.find_spec("neural_tangents") is None:
  pytest.skip("neural-tangents is not installed: the neural-tangents backend tests need the `ntk` "
              "extra (`bash install.sh ntk`)", allow_module_level=True)

# pylint: disable=g-import-not-at-top,wrong-import-position  # after the skip above
import _ntk_models
from ntk_analysis import kernels, linearized, nt_compat, readouts
from ntkcl_jax import switches
from ntkcl_jax import data, learner as learner_lib, sharding
from ntkcl_jax.configs import tiny
from ntkcl_jax.models import ntkcl, vit
# pylint: enable=g-import-not-at-top,wrong-import-position

NT = "neural_tangents"  # kernels.ntk_fn's backend name for neural-tangents
RTOL = 1e-5  # max |K - K_ref| / max |K_ref|, float32 Jacobians
FUSIONS = {"official": False, "fix_fusion": True}  # single-token / multi-token attention fusion


def test_neural_tangents_imports_through_nt_compat():
  """Installed means usable: a broken import fails here instead of skipping."""
  nt = nt_compat.import_neural_tangents()
  assert callable(nt.empirical_ntk_fn)


@pytest.fixture(scope="module")
def tiny_vit_adapter():
  make_f, peft, x = _ntk_models.tiny_vit_adapter()
  return make_f(), peft, x[:4]


def mlp(params, x):
  return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _mlp_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w1": jax.random.normal(k1, (3, 16)), "w2": jax.random.normal(k2, (16, 2)) / 4}


def test_import_reports_the_jax_version_problem_clearly(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "99.0")
  with pytest.raises(ImportError, match="supports jax"):
    nt_compat.import_neural_tangents()


def test_t7_wide_relu_mlp_converges_to_the_analytic_ntk():
  nt = nt_compat.import_neural_tangents()
  stax = nt.stax
  x = np.random.RandomState(0).randn(8, 6).astype(np.float32)
  errs = {}
  for width in (64, 1024):
    init, apply, kernel_fn = stax.serial(stax.Dense(width), stax.Relu(), stax.Dense(width),
                                         stax.Relu(), stax.Dense(1))
    analytic = np.asarray(kernel_fn(x, None, "ntk"))
    e = []
    for seed in range(3):
      _, params = init(jax.random.PRNGKey(seed), x.shape)
      emp = kernels.empirical_ntk(apply, params, x)
      e.append(np.linalg.norm(emp - analytic) / np.linalg.norm(analytic))
    errs[width] = np.mean(e)
  print("T7 mean relative Frobenius error vs stax:", errs)
  assert errs[1024] < 0.12 and errs[1024] < errs[64], errs
  # and our own arc-cosine recursion (Jacot et al. 2018) equals stax's analytic kernel
  # (stax computes in float32: arccos near cos = 1 costs it ~1e-4 on the diagonal)
  np.testing.assert_allclose(arccos_ntk(x, depth=2), analytic, rtol=1e-3, atol=1e-5)


def arccos_ntk(x, depth):
  """NTK of Dense-ReLU networks in NTK parameterisation (W_std=1, b_std=0), closed form."""
  x = np.asarray(x, np.float64)
  sigma = x @ x.T / x.shape[1]
  theta = sigma.copy()
  for _ in range(depth):
    d = np.sqrt(np.diag(sigma))
    cos = np.clip(sigma / np.outer(d, d), -1, 1)
    ang = np.arccos(cos)
    new_sigma = np.outer(d, d) * (np.sin(ang) + (np.pi - ang) * cos) / (2 * np.pi)
    dot = (np.pi - ang) / (2 * np.pi)
    theta = new_sigma + theta * dot
    sigma = new_sigma
  return theta



@pytest.mark.parametrize("impl", [1, 2, 3, 0])
def test_t12_neural_tangents_implementations_agree_with_ours(tiny_vit_adapter, impl):
  f, p, x = tiny_vit_adapter
  ours = kernels.empirical_ntk(f, p, x[:2], x[2:])
  theirs = kernels.empirical_ntk(f, p, x[:2], x[2:], backend=NT, implementation=impl)
  err = np.abs(ours - theirs).max() / np.abs(ours).max()
  print(f"neural-tangents implementation {impl} vs ours: max relative diff {err:.1e}")
  assert err < 1e-5


@pytest.mark.parametrize("impl", [1, 2, 3, 0])
def test_t12_full_kernels_agree_on_an_mlp(impl):
  p = _mlp_params()
  x = np.random.RandomState(0).randn(5, 3).astype(np.float32)
  ours = kernels.empirical_ntk(mlp, p, x, trace=False)
  theirs = nt_compat.empirical_ntk(mlp, p, x, None, trace=False, implementation=impl)
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


def test_t12_predict_gradient_descent_mse_normalisation():
  nt = nt_compat.import_neural_tangents()
  rng = np.random.RandomState(0)
  a = rng.randn(6, 6)
  k, kx = a @ a.T / 6, rng.randn(3, 6) / 3
  y, f0, f0t = rng.randn(6, 2), rng.randn(6, 2), rng.randn(3, 2)
  predict = nt.predict.gradient_descent_mse(k, y, learning_rate=0.7)
  tr_nt, te_nt = predict(5.0, f0, f0t, kx)
  tr, te = linearized.gd_mse_continuous(k, kx, y, f0, f0t, eta=0.7, time=5.0)
  np.testing.assert_allclose(tr, tr_nt, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(te, te_nt, rtol=1e-4, atol=1e-5)


def test_t12_nt_batch_tiling_equals_our_chunking():
  nt = nt_compat.import_neural_tangents()
  p = _mlp_params()
  x = np.random.RandomState(1).randn(8, 3).astype(np.float32)
  fn = nt.batch(nt.empirical_ntk_fn(mlp, vmap_axes=0), batch_size=2, device_count=0)
  np.testing.assert_allclose(np.asarray(fn(x, None, p)),
                             kernels.empirical_ntk(mlp, p, x, chunk=3), rtol=1e-5, atol=1e-6)


# -- the full NTK-CL readout (readouts.model_readout) of a trained learner state ---------------
def _full_readout_config(fix_fusion: bool):
  """configs/tiny.py (both branches, one frozen set, two blocks: a prompt made in block l
  reaches CLS only through block l+1's attention) with non-zero patch prompts (fix_patch_init)
  and the single- or multi-token attention fusion; every other switch off."""
  c = tiny.get_config()
  c.method.variant = "corrected"
  for s in switches.NAMES:
    c.method[s] = False
  c.method.fix_patch_init, c.method.fix_fusion = True, fix_fusion
  c.optim.epochs = 1
  return c


@pytest.fixture(scope="module")
def trained_ntkcl():
  """A state after one epoch of real SGD steps on task 0 and its task end (EMA into the frozen
  set, prototypes), trained with the multi-token fusion so that its query and key move too; the
  official single-token model reads the same parameter tree. Also 4 images, 2 of each of the
  first two tasks (model input)."""
  cfg = _full_readout_config(True)
  backbone = vit.init_params(ntkcl.vit_config(cfg), jax.random.PRNGKey(0))
  lrn = learner_lib.Learner(cfg, backbone, sharding.make_mesh())
  stream = data.build_stream(cfg)
  init = lrn.init_state(jax.random.PRNGKey(1))
  init_frozen = jax.tree_util.tree_map(np.asarray, init["frozen"])
  state = lrn.start_task(init)
  steps = 0
  for batch in stream.train_batches(0, 0, cfg.optim.batch_size):
    state, _ = lrn.train_step(state, batch, 0, stream.tasks[0])
    steps += 1
  state = lrn.end_task(state, 0, stream.eval_batches("proto", stream.tasks[0], 16))
  xs = []
  for t in (0, 1):
    batch = next(iter(stream.eval_batches("proto", stream.tasks[t], 16)))
    xs.append(stream.model_input(np.asarray(batch["image"])[np.asarray(batch["mask"])][:2]))
  learners = {name: learner_lib.Learner(_full_readout_config(fix), backbone, lrn.mesh)
              for name, fix in FUSIONS.items()}
  return dict(learners=learners, state=state, init_frozen=init_frozen, steps=steps,
              x=np.concatenate(xs), classes=stream.tasks[0])


@pytest.mark.slow
def test_trained_state_exercises_every_part_of_the_readout(trained_ntkcl):
  """The kernels below are of a non-degenerate model: training moved the parameters, the task
  end filled the frozen set (docs/method.md §3.4: after one task, the current lists) and the
  prototypes of task 0, and the patch prompts are not zero."""
  st = trained_ntkcl["state"]
  assert trained_ntkcl["steps"] >= 2 and int(st["step"]) == trained_ntkcl["steps"]
  for branch in ("channel", "patch"):
    now = jax.tree_util.tree_leaves(st["frozen"][branch])
    before = jax.tree_util.tree_leaves(trained_ntkcl["init_frozen"][branch])
    cur = jax.tree_util.tree_leaves(st["params"][branch])
    assert any(not np.allclose(a, b) for a, b in zip(now, before)), branch
    for a, c in zip(now, cur):
      np.testing.assert_allclose(a[0], c, rtol=1e-6, atol=1e-7)
  assert max(np.abs(np.asarray(l)).max()
             for l in jax.tree_util.tree_leaves(st["params"]["patch"])) > 0
  protos = np.asarray(st["prototypes"])
  assert all(np.abs(protos[c]).sum() > 0 for c in trained_ntkcl["classes"])


def _naive_full_kernel(learner, state, view, probe, x):
  """(N, N, O, O) J J^T by one jax.jacrev of ntkcl.features over the whole trainable tree (the
  official fusion's inert query/key included), contracted in float64 on the host; and the
  per-leaf squared Jacobian norms."""
  spec, frozen = learner.spec, learner.frozen(state)
  params = learner.trainable(state)
  v = jnp.asarray(probe)

  def f(p):
    feats = ntkcl.features(spec, learner.backbone, p, frozen, jnp.asarray(x), train=False)
    if view == "all":
      return jnp.concatenate([feats[k] @ v for k in readouts.VIEWS], axis=-1)
    return feats[view] @ v
  jac = jax.jit(jax.jacrev(f))(params)
  n, o = f(params).shape
  flat = {jax.tree_util.keystr(k): np.asarray(l, np.float64).reshape(n, o, -1)
          for k, l in jax.tree_util.tree_leaves_with_path(jac)}
  j = np.concatenate(list(flat.values()), axis=-1)
  return np.einsum("aop,bqp->aboq", j, j), {k: float((l ** 2).sum()) for k, l in flat.items()}


def _traced(full):
  return np.einsum("abii->ab", full) / full.shape[-1]


def _rel(k, ref):
  return float(np.abs(np.asarray(k) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def full_readout(trained_ntkcl):
  """get(fusion, view) -> (f, params, x, naive full kernel, naive per-leaf Jacobian norms, ours)
  with ours(trace) the JAX backend's kernel; each computed once per case."""
  cache = {}

  def get(fusion, view):
    if (fusion, view) not in cache:
      lrn, st, x = trained_ntkcl["learners"][fusion], trained_ntkcl["state"], trained_ntkcl["x"]
      probe = readouts.probes(lrn.spec.feature_dim, 3, seed=0)
      f, params = readouts.model_readout(lrn, st, view, probe)
      naive, norms = _naive_full_kernel(lrn, st, view, probe, x)
      kern = {}

      def ours(trace, f=f, params=params, x=x, kern=kern):
        if trace not in kern:
          kern[trace] = kernels.empirical_ntk(f, params, x, trace=trace)
        return kern[trace]
      cache[fusion, view] = f, params, x, naive, norms, ours
    return cache[fusion, view]
  return get


@pytest.mark.slow
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_full_readout_jax_backend_equals_naive_jacrev(full_readout, fusion):
  """Our Jacobian-panel kernel (readout without the inert leaves) = jacrev J J^T of the whole
  tree; the official fusion's query/key have an exactly zero Jacobian, the multi-token's do not."""
  _, params, _, naive, norms, ours = full_readout(fusion, "fused")
  assert _rel(ours(False), naive) <= RTOL
  assert _rel(ours(True), _traced(naive)) <= RTOL
  qk = [v for k, v in norms.items() if "'fusion'" in k and ("'query'" in k or "'key'" in k)]
  assert len(qk) == 4  # kernel and bias of each
  if fusion == "official":
    assert max(qk) == 0.0 and sorted(params["fusion"]) == ["value"]
  else:
    assert min(qk) > 0.0 and sorted(params["fusion"]) == ["key", "query", "value"]
  for name in ("'channel'", "'patch'", "'value'"):  # every part reaches the fused feature
    assert sum(v for k, v in norms.items() if name in k) > 0, name


# Every implementation on the multi-token fusion; on the official fusion (whose readouts take
# longest here) the one the analysis uses by default. test_t12_* compare all of them elsewhere.
@pytest.mark.slow
@pytest.mark.parametrize("fusion,impl", [("official", 1), ("fix_fusion", 1), ("fix_fusion", 2),
                                         ("fix_fusion", 3)])
def test_full_readout_neural_tangents_equals_jax_and_naive(full_readout, fusion, impl):
  """neural-tangents' JACOBIAN_CONTRACTION (1), NTK_VECTOR_PRODUCTS (2) and
  STRUCTURED_DERIVATIVES (3) on the fused feature sketch, full and traced."""
  f, params, x, naive, _, ours = full_readout(fusion, "fused")
  for trace in (False, True):
    theirs = kernels.empirical_ntk(f, params, x, trace=trace, backend=NT, implementation=impl)
    ref = naive if not trace else _traced(naive)
    err_naive, err_ours = _rel(theirs, ref), _rel(theirs, ours(trace))
    print(f"{fusion} impl {impl} trace={trace}: vs naive {err_naive:.1e}, vs jax {err_ours:.1e}")
    assert theirs.shape == ref.shape
    assert err_naive <= RTOL and err_ours <= RTOL


@pytest.mark.slow
def test_full_readout_all_views_through_neural_tangents(full_readout):
  """The stacked 'all' readout (N, 3R: channel, patch and fused sketches), full kernel."""
  f, params, x, naive, _, _ = full_readout("fix_fusion", "all")
  assert naive.shape == (4, 4, 9, 9)
  theirs = kernels.empirical_ntk(f, params, x, trace=False, backend=NT, implementation=1)
  print(f"all views, impl 1, full: vs naive {_rel(theirs, naive):.1e}")
  assert _rel(theirs, naive) <= RTOL


def test_nt_full_readout_script_on_a_tiny_run():
  """scripts/nt_full_readout.py's pipeline (docs/ntk_nt_check.md) on the tiny config: two tasks
  trained with the launcher's pieces, the fused joint kernel by our backend, the page (the
  neural-tangents rows go through the same joint.compute: the next test; the full readout
  through neural-tangents: test_full_readout_neural_tangents_equals_jax_and_naive)."""
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from scripts import nt_full_readout  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.train.mesh_data = 1
  config.optim.epochs = 1
  config.data.max_per_class_train = 4
  setup, records, runs = nt_full_readout.run_check(config, 2, 2, 2, 0, [], log=lambda *_: None)
  assert [r["task"] for r in records] == [0, 1] and all(r["steps"] > 0 for r in records)
  assert [r["backend"] for r in runs] == ["jax"] and runs[0]["k"].shape == (4, 4)
  assert np.allclose(runs[0]["k"], runs[0]["k"].T) and np.all(np.diag(runs[0]["k"]) > 0)
  # a second row as neural-tangents would give it, to render the page's comparison columns
  runs.append(dict(runs[0], backend=NT, implementation=1, k=runs[0]["k"] * (1 + 1e-7)))
  assert setup["P"] == sum(setup["groups"].values()) > 0
  setup.update(size=16, per_class=4)
  env = {"jax": jax.__version__, "nt": "x", "python": "3", "cpus": 2, "load": "0"}
  text = nt_full_readout.page("python -m scripts.nt_full_readout", "tiny", setup, records, runs,
                              env)
  assert "python -m scripts.nt_full_readout" in text and "| jax |" in text
  assert f"| {NT} | 1 (" in text


def test_joint_kernel_through_neural_tangents_equals_ours():
  """joint.compute (every task's draw, traced) through neural-tangents' implementations equals
  our backend on a small MLP."""
  from ntk_analysis import joint  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  params = {"a": jnp.asarray(rng.randn(4, 8) / 2, jnp.float32),
            "b": jnp.asarray(rng.randn(8, 3) / 3, jnp.float32)}
  f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]  # noqa: E731
  data = {t: rng.randn(10, 4).astype(np.float32) for t in range(2)}
  ours = joint.compute(f, params, data, n=3, seed=1, trace=True)
  for impl in (1, 2, 3):
    theirs = joint.compute(f, params, data, n=3, seed=1, trace=True, backend=NT,
                           implementation=impl)
    np.testing.assert_array_equal(theirs.indices[1], ours.indices[1])
    assert _rel(theirs.k, ours.k) <= RTOL, impl
