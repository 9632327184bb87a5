"""The mesh helpers: a jitted step data-parallel over 8 or 2 devices equals one device; the
removed model axis is refused with one line (the full runs: tests/test_train.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkcl_jax import cli, config_files, train
from ntkcl_jax import sharding as sh


def _step(params, opt_state, batch, tx):
  def loss(p):
    h = jnp.tanh(batch["x"] @ p["w1"])
    return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)
  l, g = jax.value_and_grad(loss)(params)
  upd, opt_state = tx.update(g, opt_state, params)
  return optax.apply_updates(params, upd), opt_state, l


@pytest.mark.parametrize("n", [8, 2])
def test_data_parallel_steps_equal_single_device(n):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 32)).astype(np.float32) * 0.3,
            "w2": rng.normal(size=(32, 4)).astype(np.float32) * 0.3}
  batch = {"x": rng.normal(size=(16, 16)).astype(np.float32),
           "y": rng.normal(size=(16, 4)).astype(np.float32)}
  tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))

  ref_p, ref_o = params, tx.init(params)
  step1 = jax.jit(lambda p, o, b: _step(p, o, b, tx))
  for _ in range(3):
    ref_p, ref_o, ref_l = step1(ref_p, ref_o, batch)

  mesh = sh.make_mesh() if n == 8 else sh.make_mesh(n, devices=jax.devices()[:n])
  assert mesh.axis_names == ("data",) and mesh.devices.size == n
  p = sh.put_replicated(params, mesh)
  o = sh.put_replicated(tx.init(params), mesh)
  p_sh, o_sh = (jax.tree_util.tree_map(lambda x: x.sharding, t) for t in (p, o))
  step = jax.jit(lambda p, o, b: _step(p, o, b, tx),
                 in_shardings=(p_sh, o_sh, sh.batch_sharding(mesh)),
                 out_shardings=(p_sh, o_sh, sh.replicated(mesh)), donate_argnums=(0, 1))
  b = sh.global_batch(batch, mesh)
  # each device holds its own 16/n rows: the step really is split over the devices
  assert [s.data.shape[0] for s in b["x"].addressable_shards] == [16 // n] * n
  for _ in range(3):
    p, o, l = step(p, o, b)
  np.testing.assert_allclose(l, ref_l, rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(p[k], ref_p[k], atol=1e-5)


def test_mesh_errors_say_what_to_change():
  with pytest.raises(ValueError, match="asked for, but 8 devices are given; set train.mesh_data"):
    sh.make_mesh(3)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    sh.check_batch_divisible(12, sh.make_mesh())


def test_removed_model_axis_is_one_line_saying_what_to_do(capsys):
  tiny = "configs/tiny.py"
  # on the command line: refused before anything is built, one `error:` line, exit 2
  with pytest.raises(SystemExit) as e:
    train.main(["train", f"--config={tiny}", "--config.train.mesh_model=2"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1
  assert err.startswith("error: config key train.mesh_model was removed")
  assert "train.mesh_data" in err
  # in a config (file) that still sets it: the launcher's mesh refuses it the same way
  config = config_files.load_config_file(tiny)
  config.train.mesh_model = 1
  with pytest.raises(cli.InputError, match="train.mesh_model was removed.*drop it"):
    train.make_mesh(config)
  del config.train["mesh_model"]
  assert train.make_mesh(config).devices.size == 8


def test_eval_rows_padded_to_the_mesh_are_masked_repeats():
  batch = {"image": np.arange(5 * 2, dtype=np.uint8).reshape(5, 2),
           "label": np.arange(5, dtype=np.int32), "mask": np.array([1, 1, 1, 1, 0], bool)}
  assert sh.pad_rows(batch, 5) is batch and sh.pad_rows(batch, 1) is batch
  out = sh.pad_rows(batch, 4)
  assert out["image"].shape == (8, 2) and out["label"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
  np.testing.assert_array_equal(out["image"][5:], np.repeat(batch["image"][-1:], 3, axis=0))
  assert out["mask"].tolist() == [True] * 4 + [False] * 4 and batch["mask"].shape == (5,)
  with pytest.raises(ValueError, match="needs its 'mask'"):
    sh.pad_rows({"image": batch["image"]}, 4)
  mesh = sh.make_mesh(3, devices=jax.devices()[:3])
  assert sh.global_batch(sh.pad_rows(batch, len(mesh.local_devices)), mesh)["image"].shape == (
      6, 2)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),  # one TPU host
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}),  # a pod slice: JAX finds the rest
    ({"TPU_PROCESS_ADDRESSES": "t0:8476,t1:8476"}, {}),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080"}, {}),  # multi-slice
    ({"MEGASCALE_NUM_SLICES": "1"}, None),
    ({"MEGASCALE_NUM_SLICES": "2"}, {}),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, {}),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),  # one task
    ({"SLURM_NTASKS": "4"}, None),  # sbatch's shell, not a task of a step
    ({"NTKCL_NUM_PROCESSES": "-1"}, {}),
    ({"NTKCL_COORDINATOR": "h:1234", "NTKCL_NUM_PROCESSES": "2", "NTKCL_PROCESS_ID": "1"},
     {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}),
    # explicit settings win over what the environment shows
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "NTKCL_COORDINATOR": "h:1",
      "NTKCL_NUM_PROCESSES": "3"}, {"coordinator_address": "h:1", "num_processes": 3,
                                    "process_id": 0}),
])
def test_distributed_start_follows_the_environment(env, expected):
  assert sh.distributed_args(env) == expected


def test_distributed_start_from_flags():
  assert sh.distributed_args({}, "h:1", 2, 1) == {"coordinator_address": "h:1",
                                                  "num_processes": 2, "process_id": 1}
  assert sh.distributed_args({"TPU_WORKER_HOSTNAMES": "a,b"}, "", -1) == {}
  with pytest.raises(ValueError, match="needs a coordinator address"):
    sh.distributed_args({}, "", 2, 0)
  assert sh.detected_cluster({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == "SLURM_NTASKS=8"
