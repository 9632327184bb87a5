"""Faithful mode against the official PyTorch code itself: golden tensors, no torch needed.

tests/data/official_golden.npz was written by scripts/official_golden.py running the official
`PromptNet` / `PromptLearner` (Programmergg/NTK-CL) at ViT-B width, 2 blocks, one frozen set, task
1 of a 10 + 10 split, with seeded random weights and dropout off (regenerate: see that script).
Each item is compared with ours through the official state dict import; the worst relative error
per item is printed (`pytest -s`).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax.checkpoints import golden, official
from ntkcl_jax.models import ntkcl, peft
from ntkcl_jax.tools import extract_features, import_official, official_step
from ntkcl_jax import cli, config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "data", "official_golden.npz")
CONFIG = os.path.join(REPO, "ntkcl_jax", "configs", "ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k")
TOL = 1e-4  # relative, per item: max |ours - official| / max |official|


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check(name, ours, ref, tol=TOL):
  err = rel_err(ours, ref)
  print(f"  {name:<48} {err:.2e}")
  assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"
  return err


def check_stored(f, key, ours, before=None, tol=TOL):
  """Compares a stored golden tensor (whole or sketched) with ours; with `before`, also the
  step's update ours - before against the official one (a much stricter test)."""
  kind, ref = golden.load_stored(f, key)
  if kind == "tensor":
    check(key, ours, ref, tol)
    if before is not None:
      check_update(key, np.asarray(ours), ref, before, tol)
    return
  mine = golden.sketch(np.asarray(ours))
  for part in ("rows", "right", "left"):
    check(f"{key} [{part}]", mine[part], ref[part], tol)
  if before is not None:  # the update of the sampled rows (the projections mix in rounding)
    b = golden.sketch(np.asarray(before))["rows"]
    check_update(f"{key} [rows]", mine["rows"], ref["rows"], b, tol)


def check_update(name, ours, ref, before, tol):
  """ours - before against ref - before. Both are float32 values, so the update is only known to
  about one ulp of the values themselves: the bound is tol, or 4 ulps of max |ref| relative to the
  update's size where that is larger (printed)."""
  upd = np.asarray(ref, np.float64) - before
  scale = max(np.max(np.abs(upd)), 1e-30)
  bound = max(tol, 4 * np.finfo(np.float32).eps * np.max(np.abs(ref)) / scale)
  err = float(np.max(np.abs((np.asarray(ours, np.float64) - before) - upd)) / scale)
  print(f"  {name + ' (update)':<48} {err:.2e}  (bound {bound:.1e})")
  assert err <= bound, f"{name} update: relative error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def gold():
  with np.load(GOLDEN) as f:
    data = {k: f[k] for k in f.files}
  sd = golden.unpack_state_dict(data)
  meta = json.loads(str(data["meta"]))
  return data, sd, meta


@pytest.fixture(scope="module")
def step(gold):
  data, sd, _ = gold
  order = data["train_order"]
  return official_step.official_step(
      sd, config_files.load_config_file(CONFIG), data["images"][order], data["labels"][order],
      nce_rows=data["nce_rows"], orth_basis=data["orth_basis"])


def test_golden_file_is_what_the_config_describes(gold):
  """The golden run used the official cifar224 settings our CIFAR-100 config carries."""
  _, _, meta = gold
  c = config_files.load_config_file(CONFIG)
  assert (meta["init_cls"], meta["increment"], meta["classes"]) == (
      c.data.init_cls, c.data.increment, c.data.num_classes)
  assert (meta["lr"], meta["weight_decay"], meta["momentum"], meta["nce_temp"],
          meta["dis_temp"], meta["reg_temp"], meta["batch_size_arg"]) == (
              c.optim.lr, c.optim.weight_decay, c.optim.momentum, c.method.nce_temp,
              c.method.dis_temp, c.method.reg_temp, c.optim.batch_size)


def test_forward_features_and_logits(gold, step):
  """Channel, patch and fused features; proxy logits; reweighted test logits (eq. of the
  prototype classifier, sigma * sum_s w_s cos) before the task."""
  data, _, _ = gold
  lrn, info = step["learner"], step["info"]
  v = info["variables"]
  x = jnp.asarray(data["images"], jnp.float32) / 255.0
  f = ntkcl.features_jit(lrn.spec, lrn.backbone, v["trainable"], v["frozen"], x, train=False)
  for name in ("channel", "patch", "fused"):
    check(f"eval {name} features", f[name], data[f"eval_{name}"], 1e-5)
  protos = np.asarray(v["prototypes"]["weight"])
  logits = ntkcl.eval_logits(lrn.spec, protos, f["fused"], info["total"],
                             sigma=info["fc_sigma"])
  check("reweighted test logits (before)", logits, data["test_logits_before"], 1e-5)
  xo = x[data["train_order"]]
  ft = ntkcl.features_jit(lrn.spec, lrn.backbone, v["trainable"], v["frozen"], xo, train=True,
                          rng=jax.random.PRNGKey(0))
  proxy = jax.tree_util.tree_map(jnp.asarray, v["proxy"])
  for name in ("channel", "patch", "fused"):
    check(f"train {name} features (dropout off)", ft[name], data[f"train_{name}"], 1e-5)
    check(f"proxy logits {name}", peft.cosine_logits(ft[name], proxy),
          data[f"proxy_logits_{name}"], 1e-5)


def test_loss_terms(gold, step):
  """Each term before weighting, and the total, of the official loss."""
  data, _, _ = gold
  for name in official_step.TERMS:
    check(f"term {name}", step["terms"][name], data[name])


def test_state_after_one_sgd_step(gold, step):
  """Every trainable tensor after the step (momentum 0.9, coupled weight decay, lr 0.025) and its
  update, and the momentum buffers (gradient + weight decay at the first step)."""
  data, sd, meta = gold
  ours = step["state_dict"]
  trainable = [n for n in meta["changed"] if not n.startswith(("backbone.pre_", "fc."))]
  for name in trainable:
    check_stored(data, f"after/{name}", ours[name], before=sd[name])
  trace = _find_trace(step["momentum"])
  mom = official.to_official({"trainable": {k: v for k, v in trace.items() if k != "proxy"},
                              "proxy": trace["proxy"]})
  names = golden.stored_names(data, "momentum/")
  assert set(names) == set(trainable), set(names) ^ set(trainable)
  for name in names:
    check_stored(data, f"momentum/{name}", mom[name].reshape(sd[name].shape))


def test_end_of_task_ema_and_prototypes(gold, step):
  """The frozen set after the running-mean EMA (t = 1: weights 1/2, 1/2), the prototypes after
  the class means (eval mode, after the EMA), and the test logits with them."""
  data, sd, _ = gold
  lrn, info = step["learner"], step["info"]
  state = lrn._ema(step["state"], jnp.int32(info["task"]))  # pylint: disable=protected-access
  frozen = official.to_official({"frozen": jax.tree_util.tree_map(np.asarray, state["frozen"])})
  pre = [n for n in frozen if n.startswith("backbone.pre_")]
  assert len(pre) == len([n for n in sd if n.startswith("backbone.pre_")])
  for name in pre:
    check_stored(data, f"after/{name}", frozen[name].reshape(sd[name].shape), before=sd[name])
  x = jnp.asarray(data["images"], jnp.float32) / 255.0
  batch = {"image": x, "label": jnp.asarray(data["labels"], jnp.int32),
           "mask": jnp.ones(len(x), bool)}
  sums = lrn._proto_sums(state, lrn.backbone, batch)  # pylint: disable=protected-access
  state = lrn._set_protos(state, *sums)  # pylint: disable=protected-access
  protos = np.asarray(state["prototypes"])[:info["total"]]
  check_stored(data, "after/fc.weight", protos, before=sd["fc.weight"])
  f = ntkcl.features_jit(lrn.spec, lrn.backbone, lrn.trainable(state), state["frozen"], x)
  logits = ntkcl.eval_logits(lrn.spec, protos, f["fused"], info["total"], sigma=info["fc_sigma"])
  check("reweighted test logits (after the task)", logits, data["test_logits_after"], 1e-5)


@pytest.mark.slow
def test_official_step_cli_reproduces_the_golden_step(gold, tmp_path):
  """`python -m ntkcl_jax.tools.official_step` on the golden inputs writes the official step's
  state dict and loss terms."""
  data, sd, meta = gold
  order = data["train_order"]
  paths = {}
  for name, arr in (("images", data["images"][order]), ("labels", data["labels"][order]),
                    ("nce_rows", data["nce_rows"]), ("orth_basis", data["orth_basis"])):
    paths[name] = str(tmp_path / f"{name}.npy")
    np.save(paths[name], arr)
  np.savez(tmp_path / "in.npz", **sd)
  out = tmp_path / "out.npz"
  proc = subprocess.run(
      [sys.executable, "-m", "ntkcl_jax.tools.official_step", f"--state_dict={tmp_path}/in.npz",
       f"--config={CONFIG}", f"--output={out}"] + [f"--{k}={v}" for k, v in paths.items()],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "out.json") as fh:
    report = json.load(fh)
  for name in official_step.TERMS:
    check(f"cli term {name}", report[name], data[name])
  assert report["nce_rows"] == data["nce_rows"].tolist()
  with np.load(out) as f:
    new = {k: f[k] for k in f.files}
  assert set(new) == set(sd)
  for name in meta["changed"]:
    if not name.startswith(("backbone.pre_", "fc.")):
      check_stored(data, f"after/{name}", new[name], before=sd[name])
  unchanged = [n for n in sd if n not in meta["changed"]]
  assert all(np.array_equal(new[n], sd[n]) for n in unchanged)


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_imported_model_logits_use_fc_sigma(gold, tmp_path, sigma):
  """import_official keeps fc.sigma and extract_features' logits use it: the official
  forward_reweight logits times sigma (the official head multiplies by it)."""
  data, sd, _ = gold
  sd = dict(sd, **{"fc.sigma": np.full((1,), sigma, np.float32)})
  import_official.save_variables(str(tmp_path), official.from_official(sd), {"config": CONFIG})
  assert float(import_official.load_variables(str(tmp_path))["prototypes"]["sigma"]) == sigma
  x = data["images"].astype(np.float32) / 255.0
  out = extract_features.extract_ntkcl(str(tmp_path), x, batch_size=len(x), progress=False)
  seen = int((np.abs(sd["fc.weight"]).sum(1) > 0).sum())  # rows of the old classes
  check(f"imported logits, fc.sigma={sigma}", out["logits"][:, :seen],
        sigma * data["test_logits_before"][:, :seen], 1e-5)
  assert np.all(np.isneginf(out["logits"][:, seen:]))  # zero rows: classes not seen yet


def test_official_step_rejects_bad_nce_rows(gold):
  data, sd, _ = gold
  with pytest.raises(cli.InputError, match="nce_rows"):
    official_step.official_step(sd, config_files.load_config_file(CONFIG), data["images"],
                                data["labels"], nce_rows=np.array([0, 0, 1]))


def _find_trace(tree):
  """The momentum buffers (optax TraceState.trace) inside the SGD chain's state."""
  if hasattr(tree, "trace"):
    return tree.trace
  if isinstance(tree, (tuple, list)):
    for t in tree:
      found = _find_trace(t)
      if found is not None:
        return found
  return None
