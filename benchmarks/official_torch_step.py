r"""The official PyTorch NTK-CL training step, timed on the same hardware as ours: the reference that
`train_step.py` is compared with.

    python -m benchmarks.official_torch_step --official_repo=PATH/TO/NTK-CL --batch=8 --steps=4

PATH is a checkout of github.com/Programmergg/NTK-CL (not vendored here: we run its code, we do
not copy it). Needs torch and timm (`bash install.sh parity`). What runs is the official
`PromptLearner._init_train` loop itself, ViT-B/16 at 224 px, on random images: `--task=1` (the
default) is the second task of Split-CIFAR-100 with the official `cifar224` settings, so one
frozen prompt set is in use and the NCE term draws from 10 old prototypes. Step time is read from
the loop's own iteration (the gap between consecutive batches it takes, so it includes its
`loss.item()` sync); the first step is a warm-up and the median of the rest is reported.

Only one thing is changed in the official code: `timm.create_model(..., pretrained=True)` would
download ViT-B/16 weights, which these machines cannot, so it is called with pretrained=False.
That changes the weight values, not the work. FLOPs are counted by PyTorch's own
`torch.utils.flop_counter.FlopCounterMode` over one step (2 FLOPs per multiply-add, like XLA's
cost analysis), and the matmul throughput is measured in the same process (2048^3, best of 5),
so the `of peak` column here and in train_step.py mean the same thing.
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time

from absl import flags

from ntkcl_jax import cli


def torch_matmul_throughput(n: int = 2048, repeats: int = 5) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


class TimedLoader:
  """Yields the same random batch `steps` times in the official loader's (index, x, y) format,
  recording the time at which each batch is taken: consecutive gaps are step times."""

  def __init__(self, x, y, steps: int):
    self.x, self.y, self.steps, self.stamps = x, y, steps, []

  def __len__(self):
    return self.steps

  def __iter__(self):
    for i in range(self.steps):
      self.stamps.append(time.perf_counter())
      yield i, self.x, self.y
    self.stamps.append(time.perf_counter())

  def step_times(self):
    return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:])]


def official_args(batch: int, frozen: int):
  """main.py's defaults with its `cifar224` overrides, on the CPU."""
  from easydict import EasyDict  # pylint: disable=g-import-not-at-top
  return EasyDict(
      model_name="both", backbone_type="vit_base_patch16_224_in1k", device=["cpu"],
      init_epochs=1, later_epochs=1, batch_size=batch, weight_decay=0.0005, min_lr=0,
      optimizer="sgd", scheduler="cosine", ffn_num=16, num_prompt_tokens=10, hidden_size=768,
      alpha=0.1, beta=1.0, gamma=0.3, nce_temp=0.03, dis_temp=1e-4, reg_temp=0.001,
      use_init_ptm=False, use_reweight=True, frozen_prompt_list_num=frozen, num_workers=0,
      dataset="cifar224", init_cls=10, increment=10, init_lr=0.025, later_lr=0.025,
      nb_classes=100, nb_tasks=10)


def build_learner(repo: str, batch: int, frozen: int, task: int):
  """The official PromptLearner, with its classifier set up as after `task` earlier tasks."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  create = timm.create_model
  timm.create_model = lambda name, pretrained=False, **kw: create(name, pretrained=False, **kw)
  from ntkcl_jax.checkpoints import official  # pylint: disable=g-import-not-at-top
  learner_module = official.import_official(repo, "models.learner")
  args = official_args(batch, frozen)
  learner = learner_module.PromptLearner(args)
  for t in range(task + 1):
    learner._cur_task = t  # pylint: disable=protected-access
    learner._known_classes = 10 * t  # pylint: disable=protected-access
    learner._total_classes = 10 * (t + 1)  # pylint: disable=protected-access
    learner._network.initialize_fc(learner._total_classes, t)  # pylint: disable=protected-access
    with torch.no_grad():  # old prototypes: any non-zero rows (replace_fc would write means)
      learner._network.fc.weight[:10 * t].normal_()  # pylint: disable=protected-access
  learner._network.to("cpu")  # pylint: disable=protected-access
  return learner


def define_flags(fv) -> None:
  flags.DEFINE_string("official_repo", None, "checkout of Programmergg/NTK-CL", flag_values=fv)
  flags.mark_flag_as_required("official_repo", flag_values=fv)
  flags.DEFINE_integer("batch", 8, "images per train batch", flag_values=fv)
  flags.DEFINE_integer("steps", 4, "timed steps (one more is the warm-up)", flag_values=fv)
  flags.DEFINE_integer("frozen_sets", 1, "official frozen_prompt_list_num", flag_values=fv)
  flags.DEFINE_integer("task", 1, "index of the task whose step is timed", flag_values=fv)
  flags.DEFINE_integer("threads", os.cpu_count(), "torch CPU threads", flag_values=fv)


def _main(fv):
  if not os.path.exists(os.path.join(fv.official_repo, "models", "learner.py")):
    raise cli.InputError(f"--official_repo={fv.official_repo} is not a checkout of "
                         "Programmergg/NTK-CL (models/learner.py missing); clone it and pass its "
                         "path")
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(fv.threads)
  torch.manual_seed(0)
  peak = torch_matmul_throughput()
  learner = build_learner(fv.official_repo, fv.batch, fv.frozen_sets, fv.task)
  x = torch.rand(fv.batch, 3, 224, 224)
  y = torch.randint(10 * fv.task, 10 * (fv.task + 1), (fv.batch,))

  def run(steps):
    loader = TimedLoader(x, y, steps)
    opt = learner.get_optimizer(lr=0.025)
    learner._init_train(loader, opt, learner.get_scheduler(opt, 1))  # pylint: disable=protected-access
    return loader.step_times()

  counter = FlopCounterMode(display=False)
  with counter:
    run(1)
  flops = counter.get_total_flops()
  times = run(fv.steps + 1)[1:]
  s = statistics.median(times)
  trainable = sum(q.numel() for q in learner._network.parameters() if q.requires_grad)  # pylint: disable=protected-access
  try:
    commit = subprocess.run(["git", "-C", fv.official_repo, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown commit"
  print(f"\nofficial code: {fv.official_repo} at {commit}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; float32 matmul throughput (2048^3, same process): "
        f"{peak / 1e9:.1f} GFLOP/s")
  print(f"official NTK-CL step, ViT-B/16 224px, batch {fv.batch}, {fv.frozen_sets} frozen "
        f"set(s), task {fv.task}, {trainable:,} trainable parameters")
  print(f"{'img/s':>8} {'s/step':>8} {'GFLOP':>9} {'GFLOP/s':>8} {'of peak':>7}  step times (s)")
  print(f"{fv.batch / s:>8.2f} {s:>8.3f} {flops / 1e9:>9.2f} {flops / s / 1e9:>8.1f} "
        f"{100 * flops / s / peak:>6.1f}%  {', '.join(f'{t:.2f}' for t in times)}")
  print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
        f" MB")
  return {"images_per_s": fv.batch / s, "s_per_step": s, "flops": flops, "peak": peak}


# Runs the benchmark; returns its measurements (images_per_s, s_per_step, flops, peak) to a caller.
main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  main()  # exit status 0, or 2 with one error line for bad input (cli.run_program)
