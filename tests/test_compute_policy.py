"""The compute policy on each platform: 'auto' resolves to float32 / 'highest' / einsum on CPU
(every CPU result unchanged) and to bf16 / JAX's default precision / fused attention on GPU and
TPU; fused attention picks cuDNN flash attention on a (mocked) GPU with bf16 and XLA's path here;
the paper configs use 'auto' unless `policy=parity`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import config_files
from ntkcl_jax import same_run
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit

PAPER = "configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k,ckpt=/x.npz,data_dir=/d"


@pytest.mark.parametrize("platform,dtype,head_dim,want", [
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.float16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"), ("cpu", jnp.bfloat16, 64, "xla"),
    ("tpu", jnp.bfloat16, 64, "xla"), ("gpu", jnp.bfloat16, 136, "xla"),
    ("gpu", jnp.bfloat16, 12, "xla")])
def test_attention_implementation_choice(platform, dtype, head_dim, want):
  impl, why = vit.attention_implementation(platform, dtype, head_dim)
  assert impl == want and why


def test_fused_attention_calls_cudnn_on_a_mocked_gpu(monkeypatch):
  calls = []

  def fake(q, k, v, scale=None, implementation=None):
    calls.append(implementation)
    return jnp.zeros_like(q)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  x = jnp.ones((2, 5, 32), jnp.bfloat16)
  for platform, dtype, want in (("gpu", jnp.bfloat16, "cudnn"), ("cpu", jnp.bfloat16, "xla"),
                                ("gpu", jnp.float32, "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
    attn = vit.SelfAttention(num_heads=4, dtype=dtype, attention="fused")
    attn.init(jax.random.PRNGKey(0), x.astype(dtype))
    assert calls[-1] == want


def test_fused_attention_on_cpu_equals_einsum():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 32))
  params = vit.SelfAttention(num_heads=4).init(jax.random.PRNGKey(0), x)
  fused = vit.SelfAttention(num_heads=4, attention="fused").apply(params, x)
  plain = vit.SelfAttention(num_heads=4).apply(params, x)
  np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)


def test_auto_resolves_per_platform_and_the_cpu_keeps_every_result():
  auto = config_files.load(PAPER)
  parity = config_files.load(PAPER + ",policy=parity")
  assert (auto.model.dtype, auto.model.matmul_precision, auto.model.attention) == ("auto",) * 3
  assert (parity.model.dtype, parity.model.matmul_precision, parity.model.attention) == (
      "float32", "highest", "einsum")
  on_cpu = ntkcl.resolve_policy(auto, "cpu")
  assert on_cpu.to_dict() == parity.to_dict()
  for platform in ("gpu", "tpu"):
    m = ntkcl.resolve_policy(auto, platform).model
    assert (m.dtype, m.matmul_precision, m.attention) == ("bfloat16", "", "fused")
  assert ntkcl.resolve_policy(parity, "gpu") is parity  # explicit values are kept
  assert ntkcl.vit_config(auto) == ntkcl.vit_config(parity)  # this machine is a CPU


def test_a_run_saved_with_the_resolved_policy_is_the_same_run():
  """The launcher saves the resolved policy; the same command ('auto') names that run again on
  the same platform, and not on another."""
  auto = config_files.load(PAPER)
  saved = same_run.config_json(auto)
  assert saved["model"]["dtype"] == "float32"  # resolved for this CPU
  assert same_run.differences(saved, auto) == []
  gpu = same_run.config_json(ntkcl.resolve_policy(auto, "gpu"))
  assert ("model.dtype", "bfloat16", "float32") in same_run.differences(gpu, auto)


def test_the_launcher_names_the_policy_and_attention_it_runs(monkeypatch):
  from ntkcl_jax import train  # pylint: disable=g-import-not-at-top
  cfg = vit.get_config("tiny", dtype=jnp.bfloat16, attention="fused", matmul_precision=None)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  line = train.policy_line(cfg)
  assert line.startswith("compute: bfloat16, matmul precision default, attention fused")
  assert "(cudnn: GPU, bfloat16 compute" in line
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert "(xla: no GPU (cpu))" in train.policy_line(cfg)
