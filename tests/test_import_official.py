"""Official NTK-CL state dicts <-> our variables: names, transpositions and round trips, checked
against torch's own Linear arithmetic (the official modules are Linear layers)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ntkcl_jax import tree_utils
from ntkcl_jax.checkpoints import official
from ntkcl_jax.models import ntkcl, peft, vit
from ntkcl_jax.tools import import_official

torch = pytest.importorskip("torch")
F = torch.nn.functional

VCFG = vit.get_config("tiny", image_size=16, patch_size=4, hidden_size=32, num_layers=2,
                      num_heads=4, mlp_dim=64)


def _randomize(tree, seed):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(rng.randn(*np.shape(x)), np.float32) for x in leaves])


@pytest.fixture(scope="module")
def variables():
  spec = ntkcl.ModelSpec(VCFG, method="ntkcl", ffn_num=4, num_prompts=2, frozen_sets=1,
                         section_weights=(0.3, 0.1))
  key = jax.random.PRNGKey(0)
  trainable = ntkcl.init_trainable(spec, key)
  v = {"backbone": vit.init_params(VCFG, key), "trainable": trainable,
       "frozen": ntkcl.init_frozen(spec, key), "reg_ref": trainable,
       "prototypes": {"weight": np.zeros((6, 64), np.float32), "sigma": np.ones((), np.float32)},
       "proxy": {"weight": np.zeros((2, 64), np.float32), "sigma": np.ones((), np.float32)}}
  return _randomize(v, 1)


def test_official_names_and_shapes(variables):
  sd = official.to_official(variables, num_heads=4)
  d, r, p, n = 32, 4, 2, 17
  expect = {"backbone.channel_prompt_list.1.down_proj.weight": (r, d),
            "backbone.channel_prompt_list.1.up_proj.weight": (d, r),
            "backbone.pre_channel_prompt_list.0.down_proj.bias": (r,),
            "backbone.patch_prompt_list.0.global_patch_prompt.weight": (p, n),
            "backbone.patch_prompt_list.0.prompt_norm.weight": (d,),
            "backbone.pre_patch_prompt_list.1.prompt_norm.bias": (d,),
            "fusion_model.value.weight": (2 * d, 2 * d), "reg_fusion_model.query.bias": (2 * d,),
            "reg_channel_prompt_list.0.up_proj.weight": (d, r),
            "backbone.blocks.1.attn.q_proj.weight": (d, d), "backbone.blocks.0.fc1.weight": (64, d),
            "backbone.patch_embed.proj.weight": (d, 3, 4, 4), "backbone.pos_embed": (1, n, d),
            "fc.weight": (6, 2 * d), "fc.sigma": (1,), "proxy_fc.weight": (2, 2 * d)}
  for k, shape in expect.items():
    assert sd[k].shape == shape, k


def test_import_of_export_is_identity(variables):
  back = official.from_official(official.to_official(variables, num_heads=4), num_heads=4)
  a, b = tree_utils.flatten(variables), tree_utils.flatten(back)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg=k)


def test_export_of_import_is_identity(variables):
  sd = official.to_official(variables, num_heads=4)
  again = official.to_official(official.from_official(sd, num_heads=4), num_heads=4)
  assert sorted(sd) == sorted(again)
  for k in sd:
    np.testing.assert_array_equal(sd[k], again[k], err_msg=k)


def test_imported_modules_compute_what_the_torch_linears_compute(variables):
  """Channel adapter (docs/method.md §1.2) and fusion eval output (docs/method.md §1.5) from the official tensors with
  torch's F.linear equal our modules applied to the imported parameters."""
  sd = {k: torch.from_numpy(v) for k, v in official.to_official(variables, 4).items()}
  h = np.random.RandomState(2).randn(3, 5, 32).astype(np.float32)
  pre = "backbone.channel_prompt_list.0."
  x = F.relu(F.linear(torch.from_numpy(h), sd[pre + "down_proj.weight"], sd[pre + "down_proj.bias"]))
  ref = 0.1 * F.linear(x, sd[pre + "up_proj.weight"], sd[pre + "up_proj.bias"])
  ad = variables["trainable"]["channel"]["Transformer"]["encoderblock_0"]["adapter"]
  ours = peft.ChannelAdapter(ffn_num=4, scalar=0.1).apply({"params": ad}, h, deterministic=True)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-5)

  c, p = (np.random.RandomState(s).randn(3, 64).astype(np.float32) for s in (3, 4))
  v = F.linear(torch.from_numpy(c), sd["fusion_model.value.weight"], sd["fusion_model.value.bias"])
  ref = 0.5 * v + torch.from_numpy(c) + 0.1 * torch.from_numpy(p)
  fus = peft.AttentionFusion(num_heads=8)
  ours = fus.apply({"params": variables["trainable"]["fusion"]}, c, p, deterministic=True)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-5)

  q = F.linear(torch.from_numpy(h), sd["backbone.blocks.0.attn.q_proj.weight"],
               sd["backbone.blocks.0.attn.q_proj.bias"]).numpy()
  att = variables["backbone"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
  ours = np.einsum("btd,dhk->bthk", h, att["query"]["kernel"]) + att["query"]["bias"]
  np.testing.assert_allclose(ours.reshape(3, 5, 32), q, rtol=1e-5, atol=1e-5)


def test_cli_import_then_export_round_trip(variables, tmp_path):
  sd = official.to_official(variables, num_heads=4)
  pth = tmp_path / "official.pth"
  torch.save({"module." + k: torch.from_numpy(v) for k, v in sd.items()}, pth)  # DataParallel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *a: subprocess.run([sys.executable, "-m", "ntkcl_jax.tools.import_official", *a],
                                  cwd=root, capture_output=True, text=True, timeout=300)
  p = run(f"--state_dict={pth}", f"--output={tmp_path / 'vars'}", "--num_heads=4")
  assert p.returncode == 0, p.stderr[-2000:]
  loaded = import_official.load_variables(str(tmp_path / "vars"))
  for k, v in tree_utils.flatten(variables).items():
    np.testing.assert_array_equal(tree_utils.flatten(loaded)[k], np.asarray(v), err_msg=k)
  p = run("--export", f"--variables={tmp_path / 'vars'}", f"--output={tmp_path / 'out.pth'}",
          "--num_heads=4")
  assert p.returncode == 0, p.stderr[-2000:]
  out = torch.load(tmp_path / "out.pth", weights_only=True)
  assert sorted(out) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(out[k].numpy(), sd[k], err_msg=k)
