r"""One faithful NTK-CL training step from an official PyTorch state dict, term by term.

    python -m ntkcl_jax.tools.official_step --state_dict=IN.pth \
        --config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k \
        --images=X.npy --labels=Y.npy --nce_rows=ROWS.npy --output=OUT.pth

IN is a `PromptNet` state dict of the official code (Programmergg/NTK-CL) saved during a task:
`fc` holds the classes seen so far and `proxy_fc` the current task's, which fixes the task; the
config gives the class split and the optimiser (lr of epoch `--epoch` of the per-epoch cosine
schedule, momentum, coupled weight decay, loss weights). The backbone depth and width are read
from the state dict. The step is the faithful one, on the batch as given (no augmentation), with
all dropout off (adapter and fusion attention dropout: the official code draws both at random).

X.npy: (B, 224, 224, 3) or (B, 3, 224, 224) images, float in [0, 1] (what ToTensor gives) or
uint8. Y.npy: (B,) global class ids of the current task. ROWS.npy: the NCE's old-prototype rows,
int indices into `fc.weight[:-increment]` in the order the official code concatenates them (its
`randperm(...)[:batch_size]`); without it they are drawn from `--seed`. `--orth_basis=B.npy`
gives the (D, 40) basis `U[:, :40]` of the official SVD: while the old prototypes span fewer than
40 directions the rest is the SVD library's arbitrary completion, which changes the
orthogonality term (docs/variants.md); without it we compute our own.

Writes OUT (the updated state dict: .pth needs torch, .npz does not) and OUT.json with every loss
term before weighting, `ce_channel`, `ce_patch`, `ce_fused`, `nce_term` (as it enters the loss,
sign included), `orthogonality`, `l2`, and the total `loss`, plus the step's settings.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ntkcl_jax import cli, config_files, learner as learner_lib, losses, normalization, sharding
from ntkcl_jax.checkpoints import official
from ntkcl_jax.models import ntkcl

TERMS = {"ce_channel": "ce_channel", "ce_patch": "ce_patch", "ce_fused": "ce_fused",
         "nce_term": "nce", "orthogonality": "orth", "l2": "reg", "loss": "loss"}


def read_state_dict(path: str) -> dict:
  """A state dict from .pth / .pt (torch.load) or .npz (name -> array), as numpy arrays."""
  if not os.path.isfile(path):
    raise cli.InputError(f"state dict not found: {path}")
  if path.endswith(".npz"):
    try:
      with np.load(path) as f:
        return {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as e:
      raise cli.InputError(f"{path} is not a readable .npz state dict ({e})") from e
  import torch  # pylint: disable=g-import-not-at-top  # optional: only .pth files need torch
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many types on bad files
    raise cli.InputError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: "
                         f"{e})") from e
  sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
  if not isinstance(sd, dict):
    raise cli.InputError(f"{path} holds a {type(sd).__name__}, not a state dict")
  return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def write_state_dict(path: str, sd: dict) -> None:
  if path.endswith(".npz"):
    np.savez(path, **sd)
    return
  import torch  # pylint: disable=g-import-not-at-top  # optional: only .pth output needs torch
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)


def _model_overrides(config, sd: dict) -> None:
  """Depth, width and image size of the official backbone in the state dict, into the config."""
  need = ("backbone.cls_token", "backbone.pos_embed", "fc.weight", "proxy_fc.weight")
  missing = [k for k in need if k not in sd]
  if missing:
    raise cli.InputError(f"not an official NTK-CL PromptNet state dict saved during a task: "
                         f"missing {missing}")
  depth = 1 + max(int(m.group(1)) for m in (re.match(r"backbone\.blocks\.(\d+)\.", k) for k in sd)
                  if m)
  width = int(sd["backbone.cls_token"].shape[-1])
  tokens = int(sd["backbone.pos_embed"].shape[1])
  patch = int(sd["backbone.patch_embed.proj.weight"].shape[-1])
  side = int(round((tokens - 1) ** 0.5))
  vcfg = ntkcl.vit_config(config)
  with config.unlocked():
    if depth != vcfg.num_layers:
      config.model.overrides.num_layers = depth
    if width != vcfg.hidden_size:
      raise cli.InputError(f"state dict width {width} != config model {config.model.name} "
                           f"({vcfg.hidden_size}); use a config with the state dict's backbone")
    config.model.image_size = side * patch


def faithful_config(config, sd: dict):
  """The config of a faithful step on this state dict: official variant, dropout off."""
  config = config.copy_and_resolve_references()
  _model_overrides(config, sd)
  with config.unlocked():
    config.method.variant = "official"
    config.method.adapter_dropout = 0.0
    config.method.fusion_dropout = 0.0
    config.train.mesh_data = 1
  return config


def task_of(config, sd: dict) -> tuple:
  """(task index, first class, classes of the task) from fc / proxy_fc rows and the split."""
  total, n_new = int(sd["fc.weight"].shape[0]), int(sd["proxy_fc.weight"].shape[0])
  lo = total - n_new
  d = config.data
  starts = [0] + list(range(d.init_cls, d.num_classes, d.increment))
  if lo not in starts:
    raise cli.InputError(f"fc has {total} rows and proxy_fc {n_new}: the task would start at "
                         f"class {lo}, which is no task start of the config's split "
                         f"(init_cls {d.init_cls}, increment {d.increment})")
  t = starts.index(lo)
  if n_new != (d.init_cls if t == 0 else d.increment):
    raise cli.InputError(f"proxy_fc has {n_new} rows but task {t} of the config has "
                         f"{d.init_cls if t == 0 else d.increment} classes")
  return t, lo, n_new


def state_from_official(sd: dict, config, key=None):
  """(learner, state, info): our learner and its state holding an official state dict.

  `info`: task, lo, n_new, fc_sigma, variables (what `official.from_official` read).
  The optimiser state is fresh (torch's SGD starts its momentum at the first step as we do).
  """
  variables = official.from_official(sd, num_heads=ntkcl.vit_config(config).num_heads)
  t, lo, n_new = task_of(config, sd)
  if "fusion" not in variables["trainable"] or not variables["frozen"]:
    raise cli.InputError("the state dict has no fusion_model or no pre_ prompt lists: only the "
                         "official 'both' model with one frozen set is supported")
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  lrn = learner_lib.Learner(config, variables["backbone"], mesh)
  state = lrn.init_state(key if key is not None else jax.random.PRNGKey(0))
  if lrn.n_max != n_new:
    raise cli.InputError(f"proxy_fc has {n_new} rows; the config's largest task has {lrn.n_max}")
  protos = np.zeros(state["prototypes"].shape, np.float32)
  fc = variables["prototypes"]["weight"]
  if fc.shape[1] != protos.shape[1]:
    raise cli.InputError(f"fc.weight is {fc.shape}; the config's feature is {protos.shape[1]}-d "
                         "(check use_init_ptm and frozen sets)")
  protos[:fc.shape[0]] = fc
  params = dict(jax.tree_util.tree_map(jnp.asarray, variables["trainable"]),
                proxy=jax.tree_util.tree_map(jnp.asarray, variables["proxy"]))
  state = dict(state, params=params, opt=lrn.tx.init(params),
               frozen=jax.tree_util.tree_map(jnp.asarray, variables["frozen"]),
               reg_ref=jax.tree_util.tree_map(jnp.asarray, variables["reg_ref"]),
               prototypes=jnp.asarray(protos))
  info = {"task": t, "lo": lo, "n_new": n_new, "total": lo + n_new, "variables": variables,
          "fc_sigma": float(variables["prototypes"]["sigma"])}
  return lrn, state, info


def official_basis(prototypes_seen: np.ndarray, k: int) -> np.ndarray:
  """B = U[:, :k] of the column-normalised fc.weight^T over the seen classes (faithful form)."""
  return np.asarray(losses.orth_basis(jnp.asarray(prototypes_seen), k, corrected=False))


def as_images(x: np.ndarray, size: int) -> np.ndarray:
  """(B, S, S, 3) float32 in [0, 1] from NHWC / NCHW, float [0, 1] or uint8."""
  x = np.asarray(x)
  if x.ndim != 4:
    raise cli.InputError(f"images must be 4-D (B, H, W, 3) or (B, 3, H, W), got {x.shape}")
  if x.shape[1] == 3 and x.shape[-1] != 3:
    x = np.transpose(x, (0, 2, 3, 1))
  if x.shape[1:] != (size, size, 3):
    raise cli.InputError(f"images are {x.shape[1:]}, the state dict's model takes "
                         f"({size}, {size}, 3)")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255)
  x = x.astype(np.float32)
  if x.min() < 0 or x.max() > 1:
    raise cli.InputError("float images must be in [0, 1] (what the official ToTensor gives)")
  return x


def official_step(sd: dict, config, images: np.ndarray, labels: np.ndarray,
                  nce_rows: Optional[np.ndarray] = None, orth_basis: Optional[np.ndarray] = None,
                  epoch: int = 0, seed: int = 0) -> dict:
  """One faithful step; returns dict(state_dict, terms, momentum, state, learner, info)."""
  config = faithful_config(config, sd)
  lrn, state, info = state_from_official(sd, config, jax.random.PRNGKey(seed))
  lo, n_new = info["lo"], info["n_new"]
  labels = np.asarray(labels).astype(np.int32).reshape(-1)
  x = as_images(images, config.model.image_size)
  if len(labels) != len(x):
    raise cli.InputError(f"{len(x)} images but {len(labels)} labels")
  if labels.min() < lo or labels.max() >= lo + n_new:
    raise cli.InputError(f"labels must be the current task's global class ids [{lo}, "
                         f"{lo + n_new}); got {sorted(set(labels.tolist()))}")
  kk = config.optim.batch_size
  pool = int(learner_lib.old_pool_size(lo, n_new, config.data.increment, False))
  if nce_rows is None:
    j, valid = lrn.nce_rows(jax.random.PRNGKey(seed), jnp.int32(lo), jnp.int32(n_new))
    nce_rows = np.asarray(j)[np.asarray(valid)]
  nce_rows = np.asarray(nce_rows).astype(np.int32).reshape(-1)
  if len(nce_rows) != min(kk, pool):
    raise cli.InputError(f"nce_rows has {len(nce_rows)} entries; the official draw takes "
                         f"min(batch_size {kk}, pool {pool}) = {min(kk, pool)}")
  if len(nce_rows) and (nce_rows.min() < 0 or nce_rows.max() >= pool or
                        len(set(nce_rows.tolist())) != len(nce_rows)):
    raise cli.InputError(f"nce_rows must be distinct indices into the {pool} old prototypes")
  rows = (jnp.asarray(np.pad(nce_rows, (0, kk - len(nce_rows)))),
          jnp.arange(kk) < len(nce_rows))
  k = state["orth_basis"].shape[1]
  if orth_basis is None:
    fc = np.asarray(state["prototypes"])[:info["total"]]
    rank = np.linalg.matrix_rank(fc)
    if rank < k:
      logging.warning("the old prototypes span %d < %d directions: the orthogonality term "
                      "depends on the SVD library's completion; pass --orth_basis for the "
                      "official one", rank, k)
    orth_basis = official_basis(fc, k)
  orth_basis = np.asarray(orth_basis, np.float32)
  if orth_basis.shape != tuple(state["orth_basis"].shape):
    raise cli.InputError(f"orth_basis is {orth_basis.shape}, expected "
                         f"{tuple(state['orth_basis'].shape)}")
  state = dict(state, orth_basis=jnp.asarray(orth_basis))
  batch = {"image": jnp.asarray(normalization.normalize(x, config.model.normalize)),
           "label": jnp.asarray(labels), "mask": jnp.ones(len(labels), bool)}
  lr = learner_lib.cosine_lr(config.optim.lr, epoch, config.optim.epochs)
  new, _, terms = lrn.step_given(state, lrn.backbone, batch, jnp.float32(lr), jnp.int32(lo),
                                 jnp.int32(n_new), rows, jax.random.PRNGKey(seed))
  variables = dict(info["variables"])
  params = jax.tree_util.tree_map(np.asarray, new["params"])
  variables["trainable"] = {k_: v for k_, v in params.items() if k_ != "proxy"}
  variables["proxy"] = params["proxy"]
  out_sd = official.to_official(variables, num_heads=lrn.vcfg.num_heads)
  out_sd = {k_: out_sd[k_].reshape(sd[k_].shape) if k_ in sd else out_sd[k_] for k_ in out_sd}
  result_terms = {name: float(terms[ours]) for name, ours in TERMS.items()}
  return {"state_dict": out_sd, "terms": result_terms, "state": new, "learner": lrn,
          "info": info, "lr": lr, "nce_rows": nce_rows, "config": config,
          "momentum": jax.tree_util.tree_map(np.asarray, new["opt"])}


def _load_npy(path: str, what: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise cli.InputError(f"{what} file not found: {path}")
  try:
    return np.load(path)
  except (OSError, ValueError) as e:
    raise cli.InputError(f"{path} is not a readable .npy file ({e})") from e


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("state_dict", "config", "images", "labels", "output"):
    if not getattr(f, name):
      raise cli.InputError(f"--{name} is required (see --help)")
  config = config_files.load_config_file(f.config)
  res = official_step(
      read_state_dict(f.state_dict), config, _load_npy(f.images, "--images"),
      _load_npy(f.labels, "--labels"),
      nce_rows=_load_npy(f.nce_rows, "--nce_rows") if f.nce_rows else None,
      orth_basis=_load_npy(f.orth_basis, "--orth_basis") if f.orth_basis else None,
      epoch=f.epoch, seed=f.seed)
  write_state_dict(f.output, res["state_dict"])
  report = dict(res["terms"], task=res["info"]["task"], lr=res["lr"],
                nce_rows=res["nce_rows"].tolist(), orth_basis=f.orth_basis or "computed",
                state_dict=os.path.abspath(f.state_dict), config=f.config)
  json_path = os.path.splitext(f.output)[0] + ".json"
  with open(json_path, "w") as fh:
    json.dump(report, fh, indent=1)
  print(f"task {report['task']}, lr {res['lr']:g}: loss {res['terms']['loss']:.6f} -> "
        f"{f.output}, {json_path}")


def _define_flags() -> None:
  flags.DEFINE_string("state_dict", "", "official PromptNet state dict (.pth, or .npz of arrays)")
  flags.DEFINE_string("config", "", "our config file of the benchmark (split, optimiser, losses)")
  flags.DEFINE_string("images", "", ".npy images (B, H, W, 3) or (B, 3, H, W), [0, 1] or uint8")
  flags.DEFINE_string("labels", "", ".npy (B,) global class ids of the current task")
  flags.DEFINE_string("nce_rows", "", ".npy int indices into fc.weight[:-increment] (official "
                      "randperm draw); default: drawn from --seed")
  flags.DEFINE_string("orth_basis", "", ".npy (D, 40) official SVD basis U[:, :40] (optional)")
  flags.DEFINE_string("output", "", "updated state dict (.pth or .npz); OUT.json beside it")
  flags.DEFINE_integer("epoch", 0, "epoch of the task whose cosine learning rate is used")
  flags.DEFINE_integer("seed", 0, "PRNG seed for an NCE draw when --nce_rows is not given")


if __name__ == "__main__":
  _define_flags()
  app.run(cli.guard(main))
