r"""NTK-CL on one of the nine paper benchmarks with ViT-B/16 (AugReg), official hyperparameters.

COMMAND (one seed; the paper reports the mean over seeds 0-4, see scripts/multi_seed.py):
  python -m ntkcl_jax.train --config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k,ckpt=/path/to/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz,data_dir=/path/to/data --workdir=workdirs/cifar100_in21k-seed0
or set NTKCL_CHECKPOINT_DIR and NTKCL_DATA_DIR and leave out ckpt and data_dir.
Needs a GPU or TPU for a reasonable wall time (ViT-B/16 at 224 px, 4-5 forward passes per image).

Config args (big_vision style, `--config=configs/ntkcl_benchmarks.py:key=value,...`):
  benchmark  cifar100, imagenet_r, imagenet_a, domainnet, oxford_pets, eurosat, plantvillage,
             vtab or kvasir (required)
  backbone   in21k: ViT-B/16 pretrained on ImageNet-21k (timm 0.6.12 vit_base_patch16_224_in21k);
             in1k: the same fine-tuned on ImageNet-1k (vit_base_patch16_224) (required)
  ckpt       the AugReg .npz; default $NTKCL_CHECKPOINT_DIR/<official file name below>, from
             gs://vit_models/augreg/<file name>
  data_dir   where the benchmark's files are; default $NTKCL_DATA_DIR (or tfds's default for CIFAR)
  variant    official (the official code's numerics) or corrected
  policy     auto (default): the compute policy of the platform the run starts on: bf16 compute,
             fused attention (cuDNN flash attention on a GPU) and the platform's default matmul
             precision on GPU/TPU; float32, 'highest' and the official op order on CPU (every CPU
             result unchanged); parity: float32 / 'highest' / einsum everywhere, for comparing
             with the official PyTorch code. The launcher saves the resolved policy with the run.
A missing checkpoint or data path stops the launcher with a message naming the path.

The table below is the one place the official numbers live. Values are those of the official code
after its `main.py` per-dataset overrides (Programmergg/NTK-CL @ 24de712): SGD momentum 0.9,
coupled weight decay, per-epoch cosine schedule, batch and epochs per dataset, nce_temp 0.03 only
for CIFAR-100, the extra init-PTM feature section (weights 1.0, 0.3, 0.1) for the last five
datasets, seeds 0-4 (`--config.seed`), class order = np.random.permutation(C).
"""
import os

from ntkcl_jax.configs import base
from ntkcl_jax.configs.config_args import parse_arg

# name: (classes, init_cls, increment, lr, batch, epochs, weight_decay, nce_temp, init_ptm, topk,
#        data source)
BENCHMARKS = {
    "cifar100": (100, 10, 10, 0.025, 16, 20, 5e-4, 0.03, False, 5, "tfds"),
    "imagenet_r": (200, 20, 20, 0.02, 16, 20, 5e-3, 0.2, False, 5, "folder"),
    "imagenet_a": (200, 20, 20, 0.02, 16, 20, 5e-3, 0.2, False, 5, "folder"),
    "domainnet": (345, 23, 23, 0.02, 96, 50, 5e-3, 0.2, False, 5, "folder"),
    "oxford_pets": (37, 7, 5, 0.02, 96, 5, 5e-3, 0.2, True, 5, "folder"),
    "eurosat": (10, 2, 2, 1e-4, 96, 5, 5e-3, 0.2, True, 1, "folder"),
    "plantvillage": (15, 3, 3, 5e-3, 96, 5, 5e-3, 0.2, True, 1, "folder"),
    "vtab": (50, 10, 10, 0.03, 96, 45, 5e-3, 0.2, True, 5, "folder"),
    "kvasir": (8, 2, 2, 5e-3, 96, 5, 5e-3, 0.2, True, 1, "folder"),
}

# The timm 0.6.12 weights the official code loads, as Google's AugReg .npz files
# (gs://vit_models/augreg/<file>).
CHECKPOINTS = {
    "in21k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "in1k": ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-"
             "steps_20k-lr_0.01-res_224.npz"),
}


def _choice(name: str, value: str, valid) -> str:
  if value not in valid:
    got = f"{name}={value!r} is not one of" if value else f"config arg {name}= is required; one of"
    raise ValueError(f"{got} {', '.join(valid)} (e.g. --config=configs/ntkcl_benchmarks.py:"
                     f"benchmark=cifar100,backbone=in21k)")
  return value


def get_config(arg=None):
  a = parse_arg(arg, benchmark="", backbone="", ckpt="", data_dir="", variant="official",
                policy="auto")
  _choice("policy", a.policy, ("auto", "parity"))
  benchmark = _choice("benchmark", a.benchmark, BENCHMARKS)
  backbone = _choice("backbone", a.backbone, CHECKPOINTS)
  (classes, init_cls, inc, lr, batch, epochs, wd, nce, init_ptm, topk,
   source) = BENCHMARKS[benchmark]
  c = base.get_config()
  c.seed = 0
  c.model.name = "ViT-B/16"
  c.model.image_size = 224
  ckpt_dir = os.environ.get("NTKCL_CHECKPOINT_DIR", "$NTKCL_CHECKPOINT_DIR")
  c.model.checkpoint = a.ckpt or os.path.join(ckpt_dir, CHECKPOINTS[backbone])
  c.model.checkpoint_format = "augreg"
  c.model.normalize = "none"  # the official transforms end at ToTensor
  if a.policy == "auto":  # resolved by the launcher for its platform (ntkcl.resolve_policy)
    c.model.dtype = c.model.matmul_precision = c.model.attention = "auto"
  c.data.name = benchmark
  c.data.source = source
  c.data.data_dir = a.data_dir or os.environ.get("NTKCL_DATA_DIR", "")
  c.data.num_classes = classes
  c.data.init_cls = init_cls
  c.data.increment = inc
  c.data.class_order = "seed"
  c.data.train_transform = "official"
  c.method.name = "ntkcl"
  c.method.variant = a.variant
  c.method.use_init_ptm = init_ptm
  c.method.section_weights = (1.0, 0.3, 0.1) if init_ptm else (0.3, 0.1)
  c.method.nce_temp = nce
  c.optim.lr = lr
  c.optim.batch_size = batch
  c.optim.epochs = epochs
  c.optim.weight_decay = wd
  c.topk = topk
  return c
