r"""Runs the speed benchmarks and writes docs/benchmarks.md (every number on the page comes from
the commands it lists, run here in subprocesses).

    python -m benchmarks.report                      # full set (ViT-B/16 rows take a while)
    python -m benchmarks.report --models=tiny,ViT-S/16 --steps=2
    python -m benchmarks.report --rerun="ViT-B/16, corrected"   # redo matching sections only

With --rerun=REGEX, sections of the existing page whose title does not match are kept verbatim
(commands and outputs) and only the matching ones are run again, e.g. after a measurement was
disturbed by other load.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time

from absl import flags

from benchmarks import branches
from ntkcl_jax import cli
from ntkcl_jax import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
  cpu = results.cpu()
  mem = ""
  try:
    with open("/proc/meminfo") as f:
      mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
  except OSError:
    pass
  return (f"{cpu}, {os.cpu_count()} CPU threads visible, {mem}, Python "
          f"{platform.python_version()}, load average at start {os.getloadavg()[0]:.1f}")


def run(cmd: list[str]) -> tuple[str, float]:
  t = time.time()
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, XLA_FLAGS=""))
  out = p.stdout.strip() or p.stderr.strip()[-3000:]
  if p.returncode:
    out += f"\n(exit code {p.returncode})"
  return out, time.time() - t


def existing_sections(path: str) -> dict:
  """{title: lines} of a page written by this script (for --rerun)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return existing_sections_from(f.read().split("\n"))


def kept_sections(path: str) -> dict:
  """existing_sections, each labelled with the CPU it was measured on: a section of a page from
  before sections named their CPU gets that page's `Machine:` CPU, so that a page rerun on
  other hardware never passes its kept numbers off as measured on the new one."""
  sections = existing_sections(path)
  with open(path) if os.path.exists(path) else open(os.devnull) as f:
    old = next((l for l in f if l.startswith("Machine: ")), "")
  cpu = old[len("Machine: "):].split(",")[0].strip() or "an earlier machine"
  for title, lines in sections.items():
    trailer = next((i for i in range(len(lines) - 1, -1, -1)
                    if re.match(r"\(\d+ s wall, \d{4}-\d\d-\d\d\)$", lines[i])), None)
    if trailer is not None:
      lines[trailer] = lines[trailer][:-1] + f", {cpu})"
  return sections


def existing_sections_from(lines: list) -> dict:
  out, title, in_code = {}, None, False
  for line in lines:
    in_code ^= line.startswith("```")  # a command's own "## " lines are output, not sections
    if line.startswith("## ") and not in_code:
      title = line[3:]
      out[title] = []
    elif title is not None:
      out[title].append(line)
  return out


HEAD_TO_HEAD = "ViT-B/16, batch 8, one frozen set"
THEIRS, OURS = HEAD_TO_HEAD + ": the official PyTorch code", HEAD_TO_HEAD + ": ntkcl-jax"


def head_to_head(lines: list) -> list:
  """Ours against the official PyTorch step at the reference shape (ViT-B/16 shapes), from the
  two sections' outputs."""
  sections = existing_sections_from(lines)
  theirs, mine = sections.get(THEIRS, []), sections.get(OURS, [])
  torch_row = next((l for l in theirs if re.match(r"\s*[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+"
                                                 r"[\d.]+%\s+[\d.]", l)), None)
  torch_peak = next((l for l in theirs if l.startswith("official code:")), None)
  ours = next((l for l in mine if "NTK-CL train step (official)" in l), None)
  xla_peak = next((l for l in mine if l.startswith("machine float32 matmul")), None)
  if not (torch_row and ours and torch_peak and xla_peak):
    return []
  t_ips, t_s, t_gf = (float(v) for v in torch_row.split()[:3])
  o = re.match(r".+?NTK-CL train step \(official\)\s+8\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", ours)
  o_ips, o_s, o_gf = (float(v) for v in o.groups())
  tp = float(re.search(r"([\d.]+) GFLOP/s", torch_peak).group(1))
  xp = float(re.search(r"([\d.]+) GFLOP/s", xla_peak).group(1))
  best = max(tp, xp)
  row = lambda name, ips, s, gf, own: (
      f"| {name} | {ips:.2f} | {s:.2f} | {gf:.0f} | {gf / s:.0f} | {100 * gf / s / own:.1f}% | "
      f"{100 * gf / s / best:.1f}% |")
  return ["## Head to head: ViT-B/16, batch 8, one frozen set", "",
          "| code | img/s | s/step | GFLOP/step | GFLOP/s | of its own library's matmul | "
          f"of the best matmul measured here ({best:.0f} GFLOP/s) |", "|---|---|---|---|---|---|---|",
          row("official PyTorch (FlopCounterMode)", t_ips, t_s, t_gf, tp),
          row("ntkcl-jax (XLA cost analysis)", o_ips, o_s, o_gf, xp), "",
          f"ntkcl-jax is {o_ips / t_ips:.2f}x the official code's images per second here.", ""]


def summary(lines: list) -> list:
  """The NTK-CL train-step rows of all sections in one table (parsed from the outputs above)."""
  rows, title = [], ""
  for l in lines:
    title = l[3:] if l.startswith("## ") else title
    if "NTK-CL train step" in l and not title.startswith("Where the time goes"):
      rows.append(l)  # (the profile section repeats a timing row: not a separate measurement)
  if not rows:
    return []
  out = ["## Summary: NTK-CL training step", "",
         "| model | variant | batch | img/s | s/step | GFLOP/step | of measured peak | XLA temp MB |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    m = re.match(r"(.+?)\s+NTK-CL train step \((\w+)\)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+"
                 r"([\d.]+)\s+[\d.]+\s+([\d.]+%)\s+[\d.]+\s+(\d+)", r)
    if m:
      out.append("| " + " | ".join(m.groups()) + " |")
  return out + [""]


def write(path: str, header: list, body: list) -> None:
  lines = "\n".join(body).split("\n")  # command outputs are multi-line strings
  with open(path, "w") as f:
    f.write("\n".join(header + head_to_head(lines) + summary(lines) + lines))


def define_flags(fv) -> None:
  branches.define_model_flags(fv)
  flags.DEFINE_string("output", os.path.join(ROOT, "docs", "benchmarks.md"), "the page written",
                      flag_values=fv)
  flags.DEFINE_string("rerun", "", "regex: rerun only matching sections, keep others",
                      flag_values=fv)
  flags.DEFINE_string("official_repo", os.environ.get("NTKCL_OFFICIAL_REPO", ""),
                      "checkout of github.com/Programmergg/NTK-CL for the head-to-head section "
                      "(default $NTKCL_OFFICIAL_REPO; skipped when empty)", flag_values=fv)


def _main(fv) -> int:
  # checked before the first section runs (each takes minutes), not when the page is written
  if not os.path.isdir(os.path.dirname(os.path.abspath(fv.output))):
    raise cli.InputError(f"--output={fv.output}: directory {os.path.dirname(fv.output)} does not "
                         "exist")
  if fv.official_repo and not os.path.isfile(os.path.join(fv.official_repo, "models",
                                                         "learner.py")):
    raise cli.InputError(f"--official_repo={fv.official_repo} is not a checkout of "
                         "Programmergg/NTK-CL (models/learner.py missing); clone it, or leave "
                         "--official_repo and $NTKCL_OFFICIAL_REPO empty to skip that section")
  try:
    re.compile(fv.rerun)
  except re.error as e:
    raise cli.InputError(f"--rerun={fv.rerun!r} is not a regular expression ({e})") from e
  py = sys.executable
  sections = []
  if fv.official_repo:
    sections.append((THEIRS, [py, "-m", "benchmarks.official_torch_step",
                              f"--official_repo={fv.official_repo}", "--batch=8",
                              f"--steps={max(fv.steps, 4)}"]))
  sections.append((OURS, [py, "-m", "benchmarks.train_step", "--model=ViT-B/16", "--batch=8",
                          f"--steps={max(fv.steps, 4)}", "--variant=official"]))
  for model in fv.models.split(","):
    for variant in ("official", "corrected"):
      cmd = [py, "-m", "benchmarks.train_step", f"--model={model}", f"--batch={fv.batch}",
             f"--steps={fv.steps}", f"--variant={variant}"]
      sections.append((f"Training step: {model}, {variant}", cmd))
  big = fv.models.split(",")[-1]
  sections.append((f"Where the time goes: {big}, batch {fv.batch}, official",
                   [py, "-m", "benchmarks.train_step", f"--model={big}", f"--batch={fv.batch}",
                    "--steps=1", "--profile"]))
  sections.append(("Batched (vmap) prompt sets against one-by-one passes",
                   [py, "-m", "benchmarks.branches", f"--models={fv.models}",
                    f"--batch={fv.batch}", "--steps=2"]))
  sections.append(("Input pipeline at 224 px", [py, "-m", "benchmarks.input_pipeline"]))
  sections.append(("Empirical NTK: joint kernel of 5 tasks x 64 images, tiny config",
                   [py, "-m", "benchmarks.ntk", "--tasks=5", "--n=64",
                    "--skip=jax:ntvp:1,neural_tangents:jacobian:2"]))
  sections.append(("Compute policy: float32 against bfloat16, einsum against fused attention, "
                   "remat", [py, "-m", "benchmarks.precision", "--accuracy_seeds=0,1,2,3,4"]))
  sections.append(("Host syncs per step", [py, "-m", "benchmarks.host_sync"]))
  sections.append(("Whole runs on 1, 3, 4 and 6 devices with eval batches that do not divide, "
                   "and the progress a run shows", [py, "-m", "benchmarks.device_runs"]))
  sections.append(("Empirical NTK across devices: joint kernel of 5 tasks x 64 images, tiny "
                   "config, host and device contraction",
                   [py, "-m", "benchmarks.ntk", "--device_counts=1,2,4,8",
                    "--contract=host,device"]))
  sections.append(("Empirical NTK: memory estimate against measured peak",
                   [py, "-m", "benchmarks.ntk", "--memory=activations,tiny",
                    "--device_counts=1,8"]))
  flag = " --official_repo=PATH" if fv.official_repo else ""  # PATH: a checkout, see below
  lines = [f"# Speed benchmarks (regenerated by `python -m benchmarks.report{flag}`)", "",
           f"Machine: {machine()}. Date: {datetime.date.today().isoformat()}.", "",
           "Each table is the verbatim output of the command above it. `of peak` divides the "
           "achieved FLOP/s (the framework's own count of the compiled step: XLA's cost analysis "
           "for ours, PyTorch's FlopCounterMode for the official code, both 2 FLOPs per "
           "multiply-add) by the float32 matmul throughput of the same library measured in the "
           "same process, so background load lowers both. The NTK-CL "
           "step does the work of about six ViT forward passes per image (two current-set "
           "branches with activation gradients only, the backbone's weights get none, and two "
           "frozen-set branches forward only): compare its GFLOP with the `reference: 1 ViT "
           "forward` row. The reference point is the official PyTorch code at ViT-B/16 "
           "shapes, batch 8, one frozen set: about 0.8 images/s, about 46% of the CPU's "
           "float32 matmul throughput; the head-to-head table runs that code here (it needs a checkout "
           "of github.com/Programmergg/NTK-CL: `--official_repo=PATH`). The two libraries' "
           "matmul throughputs differ on this CPU (compare their throughput lines), so that "
           "table also divides both steps by the best matmul measured here. Where a step stays "
           "below peak, the `Where the time goes` section traces one step and sums XLA's op "
           "times by kind of op and by model code. The two NTK device sections run on fake "
           "CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) that share this "
           "machine's cores: they show that the split kernels agree (the trace column) and "
           "what splitting costs, not the speed-up of real accelerators. Every section names "
           "the date and CPU it was measured on under its output (sections kept by `--rerun` "
           "keep theirs).", ""]
  keep = kept_sections(fv.output) if fv.rerun else {}
  body = []
  for title, cmd in sections:
    if title in keep and not re.search(fv.rerun, title):
      body += [f"## {title}"] + keep[title]
      continue
    print("running:", " ".join(cmd[1:]), flush=True)
    out, secs = run(cmd)
    body += [f"## {title}", "", "```", "$ python " + " ".join(cmd[1:]), out, "```",
             f"({secs:.0f} s wall, {datetime.date.today().isoformat()}, {results.cpu()})", ""]
    write(fv.output, lines, body)  # after every section: nothing lost on a crash
  write(fv.output, lines, body)
  print(f"wrote {fv.output}")
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
