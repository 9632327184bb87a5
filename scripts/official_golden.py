r"""Golden test data from the official NTK-CL PyTorch code: one task-1 step, end of task, logits.

    python -m scripts.official_golden --official_repo=PATH/TO/NTK-CL \
        --output=tests/data/official_golden.npz

PATH is a checkout of Programmergg/NTK-CL; its code is imported and run, never copied here.
Needs torch and timm (`bash install.sh parity`). What it does, with the official modules:

* builds `PromptNet` at ViT-B width (768, 12 heads, 224 px: the official prompt module hard-codes
  197 tokens) and `--depth` blocks, one frozen prompt set, the `cifar224` settings (10 + 10 split,
  lr 0.025, coupled weight decay 5e-4, momentum 0.9, nce_temp 0.03), at task 1 (classes 10-19);
* fills every tensor of its state dict with seeded random values (no branch trivially zero: the
  patch token-mixing Linear and LayerNorm scale, the adapter up-projections and the fusion are all
  random; the L2 targets are the current lists plus noise; the old-class prototypes are random and
  the current-class rows of `fc` are zero, as `initialize_fc` leaves them; fc.sigma is 1);
* turns all dropout off (adapter dropout and the fusion's attention dropout, which the official
  code draws at random), fixes the NCE's `randperm` draw, and records while the official
  `PromptLearner.incremental_train` runs one SGD step, the end-of-task EMA and the prototypes:
  features, proxy and reweighted test logits, each loss term, the state after the step (with the
  momentum buffers), the frozen set after the EMA, and the prototypes after the class means.

Storage (ntkcl_jax/checkpoints/golden.py): tensors of up to 65,536 entries are stored as they
are; larger seeded inputs (backbone, fusion) as their seed and SHA-256, larger computed outputs
(the fusion's step) as a sketch. The file stays at a few MB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

from absl import flags
import numpy as np

from ntkcl_jax import cli
from ntkcl_jax.checkpoints import golden
from ntkcl_jax.checkpoints import official

CLASSES, INIT_CLS, INCREMENT, TASK = 100, 10, 10, 1
BATCH_ARG = 16  # the official `batch_size` argument: caps the NCE's sampled prototypes
LR, WEIGHT_DECAY, NCE_TEMP, DIS_TEMP, REG_TEMP = 0.025, 5e-4, 0.03, 1e-4, 1e-3


def build_network(repo: str, depth: int):
  """The official PromptLearner with a `depth`-block ViT-B-width backbone (random, no download)."""
  import torch  # pylint: disable=g-import-not-at-top
  from easydict import EasyDict  # pylint: disable=g-import-not-at-top
  inc_net, learner, prompt_vit = (official.import_official(repo, f"models.{m}")
                                  for m in ("inc_net", "learner", "prompt_vit"))

  def backbone(args):
    cfg = EasyDict(ffn=True, ffn_scalar="0.1", ffn_num=args.ffn_num, d_model=768,
                   num_prompt_tokens=args.num_prompt_tokens, hidden_size=args.hidden_size,
                   frozen_prompt_list_num=args.frozen_prompt_list_num,
                   prompt_mode=args.model_name, _device="cpu", dataset=args.dataset)
    model = prompt_vit.VisionTransformer_Prompt(
        patch_size=16, embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0, drop_path_rate=0.0,
        tuning_config=cfg)
    model.out_dim = 768
    # What the official factory leaves trainable: the keys missing from the pretrained checkpoint
    # (every prompt list), then the pre_ lists frozen again.
    for name, p in model.named_parameters():
      p.requires_grad = ("prompt_list" in name) and not name.startswith("pre_")
    return model.eval()

  inc_net.get_backbone = backbone
  args = EasyDict(
      model_name="both", backbone_type="vit_base_patch16_224_in1k", device=["cpu"],
      init_epochs=1, later_epochs=1, batch_size=BATCH_ARG, weight_decay=WEIGHT_DECAY, min_lr=0,
      optimizer="sgd", scheduler="cosine", ffn_num=16, num_prompt_tokens=10, hidden_size=768,
      alpha=0.1, beta=1.0, gamma=0.3, nce_temp=NCE_TEMP, dis_temp=DIS_TEMP, reg_temp=REG_TEMP,
      use_init_ptm=False, use_reweight=True, frozen_prompt_list_num=1, num_workers=0,
      dataset="cifar224", init_cls=INIT_CLS, increment=INCREMENT, init_lr=LR, later_lr=LR,
      nb_classes=CLASSES, nb_tasks=CLASSES // INCREMENT)
  return learner.PromptLearner(args), learner, inc_net


class _Images:
  """The official data manager's dataset interface over one fixed batch: (index, image, label)."""

  def __init__(self, x, y):
    self.x, self.y, self.labels = x, y, y.numpy()

  def __len__(self):
    return len(self.y)

  def __getitem__(self, i):
    return i, self.x[i], self.y[i]


class _DataManager:
  def __init__(self, x, y):
    self.x, self.y = x, y

  def get_task_size(self, task):
    return INIT_CLS if task == 0 else INCREMENT

  def get_dataset(self, indices, source, mode):
    del indices, source, mode
    return _Images(self.x, self.y)


def make_golden(repo: str, depth: int, batch: int, seed: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  pl, learner_mod, inc_net = build_network(repo, depth)
  net = pl._network  # pylint: disable=protected-access
  net.initialize_fc(INIT_CLS + TASK * INCREMENT, TASK)  # shapes of fc / proxy_fc at task 1
  shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  sd = golden.random_state_dict(shapes, seed, first_zero_row=INIT_CLS + (TASK - 1) * INCREMENT)
  rng = np.random.Generator(np.random.PCG64([seed, 10**6]))
  images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
  lo, hi = INIT_CLS + (TASK - 1) * INCREMENT, INIT_CLS + TASK * INCREMENT
  labels = np.array([lo + 1, lo + 4, lo + 1, lo + 7, lo + 4][:batch] +
                    list(rng.integers(lo, hi, max(0, batch - 5))), np.int64)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # ToTensor: [0, 1], NCHW
  y = torch.from_numpy(labels)
  n_old = lo  # the official pool fc.weight[:-increment]: the old classes at task 1 of 10 + 10
  perm = rng.permutation(n_old)
  out = {"images": images, "labels": labels, "nce_perm": perm.astype(np.int64)}

  def load():
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    for m in net.modules():  # all dropout off: the official code draws it at random
      if hasattr(m, "down_proj"):
        m.dropout = 0.0
      if isinstance(m, torch.nn.Dropout):
        m.p = 0.0

  load()
  net.eval()
  with torch.no_grad():
    c, p, _, _ = net.backbone(x, use_init_ptm=False)
    m = net.fusion_model(c, p)
    out.update(eval_channel=c.numpy(), eval_patch=p.numpy(), eval_fused=m.numpy(),
               test_logits_before=net(x, test=True)[2]["logits"].numpy())

  # --- one official task: incremental_train (train, EMA, prototypes) with recording hooks -------
  rec = {"ce": [], "forward": [], "nce": [], "orth": [], "svd": [], "zeros": []}
  orig_init_fc = net.initialize_fc

  def init_fc(nb_classes, task):
    orig_init_fc(nb_classes, task)
    load()  # the seeded state, loaded where the official code would create its heads
  net.initialize_fc = init_fc
  pl._cur_task, pl._known_classes = TASK - 1, lo  # pylint: disable=protected-access
  orig_ce = torch.nn.functional.cross_entropy
  orig_perm, orig_svd, orig_tensor = torch.randperm, torch.linalg.svd, torch.tensor
  orig_forward, orig_orth = net.forward, net.orthogonalize_with_truncated_svd
  opt_holder = []
  orig_get_opt = pl.get_optimizer

  def ce(*a, **k):
    v = orig_ce(*a, **k)
    rec["ce"].append(v.detach().clone())
    return v

  def randperm(n, *a, **k):
    if "generator" in k:  # the DataLoader's shuffling, not the NCE draw
      return orig_perm(n, *a, **k)
    assert n == n_old and not a, (n, n_old)
    return torch.from_numpy(perm.copy())

  def svd(a, *args, **kw):
    res = orig_svd(a, *args, **kw)
    rec["svd"].append(res[0].detach().clone())
    return res

  def tensor(*a, **k):
    v = orig_tensor(*a, **k)
    if len(a) == 1 and isinstance(a[0], float) and a[0] == 0.0:
      rec["zeros"].append(v)  # the official L2 accumulator `torch.tensor(0.)`
    return v

  def forward(inp, test=False):
    res = orig_forward(inp, test=test)
    rec["forward"].append((test, [{k: v.detach().clone() for k, v in r.items()}
                                  for r in res[:3]]))
    return res

  def orth(*a, **k):
    v = orig_orth(*a, **k)
    rec["orth"].append(v.detach().clone())
    return v

  def get_optimizer(lr):
    opt = orig_get_opt(lr)
    opt_holder.append(opt)
    return opt

  net.nce_loss.register_forward_hook(
      lambda mod, inp, res: rec["nce"].append((inp[0].detach().clone(), inp[1].clone(),
                                               res.detach().clone())))
  net.forward, net.orthogonalize_with_truncated_svd = forward, orth
  pl.get_optimizer = get_optimizer
  torch.nn.functional.cross_entropy, torch.randperm = ce, randperm
  torch.linalg.svd, torch.tensor = svd, tensor
  try:
    pl.incremental_train(_DataManager(x, y))
  finally:
    torch.nn.functional.cross_entropy, torch.randperm = orig_ce, orig_perm
    torch.linalg.svd, torch.tensor = orig_svd, orig_tensor
  train_calls = [r for test, r in rec["forward"] if not test]
  assert (len(train_calls), len(rec["nce"]), len(rec["ce"]), len(rec["zeros"])) == (1, 1, 3, 1), (
      len(train_calls), len(rec["nce"]), len(rec["ce"]), len(rec["zeros"]))
  ch, pa, mi = train_calls[0]
  nce_z, nce_labels, nce_value = rec["nce"][0]
  order = nce_labels[:len(labels)].numpy()  # the loader's batch order (shuffled)
  out.update(
      train_order_labels=order,
      train_channel=ch["features"].numpy(), train_patch=pa["features"].numpy(),
      train_fused=mi["features"].numpy(), proxy_logits_channel=ch["logits"].numpy(),
      proxy_logits_patch=pa["logits"].numpy(), proxy_logits_fused=mi["logits"].numpy(),
      ce_channel=rec["ce"][0].numpy(), ce_patch=rec["ce"][1].numpy(),
      ce_fused=rec["ce"][2].numpy(), nce_rows=nce_labels[len(labels):].numpy(),
      nce_term=(-nce_value).numpy(), orthogonality=rec["orth"][0].numpy(),
      orth_basis=rec["svd"][0][:, :40].numpy(), l2=rec["zeros"][0].detach().numpy())
  # the train batch's images in loader order, found by matching the recorded features
  idx = [int(np.argmin(np.abs(out["eval_channel"] - f).sum(1))) for f in out["train_channel"]]
  out["train_order"] = np.array(idx, np.int64)
  out["loss"] = np.asarray(out["ce_channel"] + out["ce_patch"] + out["ce_fused"]
                           + NCE_TEMP * out["nce_term"] + DIS_TEMP * out["orthogonality"]
                           + REG_TEMP * out["l2"], np.float32)
  after = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
  names = {id(p): n for n, p in net.named_parameters()}
  momentum = {names[id(p)]: s["momentum_buffer"].numpy().copy()
              for p, s in opt_holder[0].state.items() if "momentum_buffer" in s}
  for k, v in after.items():
    if not np.array_equal(v, sd[k]):
      out.update(golden.store(f"after/{k}", v))
  for k, v in momentum.items():
    out.update(golden.store(f"momentum/{k}", v))
  net.eval()
  with torch.no_grad():
    out["test_logits_after"] = net(x, test=True)[2]["logits"].numpy()
  commit = "unknown"
  try:
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  meta = dict(official_commit=commit, torch=torch.__version__, depth=depth, batch=batch,
              seed=seed, classes=CLASSES, init_cls=INIT_CLS, increment=INCREMENT, task=TASK,
              batch_size_arg=BATCH_ARG, lr=LR, weight_decay=WEIGHT_DECAY, momentum=0.9,
              nce_temp=NCE_TEMP, dis_temp=DIS_TEMP, reg_temp=REG_TEMP,
              changed=golden.stored_names(out, "after/"))
  out["meta"] = np.array(json.dumps(meta))
  out.update(golden.pack_state_dict(sd, seed))
  return out


def define_flags(fv) -> None:
  flags.DEFINE_string("official_repo", None, "checkout of Programmergg/NTK-CL", flag_values=fv)
  flags.mark_flag_as_required("official_repo", flag_values=fv)
  flags.DEFINE_string("output", "tests/data/official_golden.npz", "the golden file",
                      flag_values=fv)
  flags.DEFINE_integer("depth", 2, "ViT blocks (>= 2 covers both prompt paths)", flag_values=fv)
  flags.DEFINE_integer("batch", 5, "images of the step", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of every random value", flag_values=fv)


def _main(fv) -> int:
  official.import_official(fv.official_repo, "models.inc_net")  # a checkout, or one clear error
  out = make_golden(fv.official_repo, fv.depth, fv.batch, fv.seed)
  os.makedirs(os.path.dirname(os.path.abspath(fv.output)), exist_ok=True)
  np.savez_compressed(fv.output, **out)
  print(f"wrote {fv.output}: {len(out)} arrays, {os.path.getsize(fv.output) / 2**20:.2f} MiB")
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
