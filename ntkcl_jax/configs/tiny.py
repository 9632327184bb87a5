r"""Tiny config for tests and smoke runs: a random tiny ViT on synthetic images, 3 tasks x 2 classes.

COMMAND:
  python -m ntkcl_jax.train --config=configs/tiny.py --workdir=/tmp/tiny
Takes seconds on 2 CPU cores. Accuracies mean nothing (random backbone); this exercises the code
paths (sharding, checkpoints, resume, outputs). Arg `data=digits` uses scikit-learn's real 8x8
digits (upsampled) instead of synthetic images.
"""
from ntkcl_jax.configs import base
from ntkcl_jax.configs.config_args import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, data="synthetic")
  c = base.get_config()
  c.seed = 0
  c.model.name = "tiny"
  c.model.image_size = 16
  c.model.overrides.patch_size = 4
  c.model.overrides.hidden_size = 32
  c.model.overrides.num_layers = 2
  c.model.overrides.num_heads = 2
  c.model.overrides.mlp_dim = 64
  c.model.checkpoint = ""  # random backbone
  c.data.name = a.data
  c.data.source = a.data
  c.data.num_classes = 6 if a.data == "synthetic" else 10
  c.data.init_cls = 2
  c.data.increment = 2
  c.data.max_per_class_train = 12
  c.data.max_per_class_test = 8
  c.data.train_transform = "none"
  c.method.ffn_num = 4
  c.method.num_prompt_tokens = 2
  c.optim.update(lr=0.05, weight_decay=5e-4, epochs=2, batch_size=8, eval_batch_size=16)
  c.train.update(checkpoint_every_steps=2, log_every_steps=1)
  c.topk = 2
  return c
