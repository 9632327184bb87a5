r"""NTK-CL on eurosat, ViT-B/16 pretrained on ImageNet-21k, fine-tuned on ImageNet-1k (AugReg; timm 0.6.12 vit_base_patch16_224).

Official hyperparameters (shared spec method.md 3.1); the table is in configs/ntkcl_benchmarks.py.
Checkpoint: gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz

COMMAND (one seed; the paper reports the mean over seeds 0-4, see ntkcl_jax/tools/multi_seed.py):
  python -m ntkcl_jax.train --config=configs/eurosat_in1k.py:ckpt=/path/to/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz,data_dir=/path/to/data --workdir=workdirs/eurosat_in1k-seed0
or set NTKCL_CHECKPOINT_DIR and NTKCL_DATA_DIR and leave out the config arguments.
Needs a GPU or TPU for a reasonable wall time (ViT-B/16 at 224 px, 4-5 forward passes per image).
"""
from configs import ntkcl_benchmarks


def get_config(arg=None):
  return ntkcl_benchmarks.get_config("eurosat", "in1k", arg)
