r"""Runs the speed benchmarks and writes docs/benchmarks.md (every number on the page comes from
the commands it lists, run here in subprocesses).

    python benchmarks/report.py                      # full set (ViT-B/16 rows take a while)
    python benchmarks/report.py --models=tiny,ViT-S/16 --steps=2
    python benchmarks/report.py --rerun="ViT-B/16, corrected"   # redo matching sections only

With --rerun=REGEX, sections of the existing page whose title does not match are kept verbatim
(commands and outputs) and only the matching ones are run again, e.g. after a measurement was
disturbed by other load.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

import branches  # benchmarks/branches.py, beside this file
from ntkcl_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
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


def main(argv=None):
  return cli.run(_main, argv)


def _main(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  branches.add_model_args(ap)
  ap.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks.md"))
  ap.add_argument("--rerun", default="", help="regex: rerun only matching sections, keep others")
  ap.add_argument("--official_repo", default=os.environ.get("NTKCL_OFFICIAL_REPO", ""),
                  help="checkout of github.com/Programmergg/NTK-CL for the head-to-head section "
                       "(default $NTKCL_OFFICIAL_REPO; skipped when empty)")
  a = ap.parse_args(argv)
  # checked before the first section runs (each takes minutes), not when the page is written
  if not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):
    raise cli.InputError(f"--output={a.output}: directory {os.path.dirname(a.output)} does not "
                         "exist")
  if a.official_repo and not os.path.isfile(os.path.join(a.official_repo, "models", "learner.py")):
    raise cli.InputError(f"--official_repo={a.official_repo} is not a checkout of "
                         "Programmergg/NTK-CL (models/learner.py missing); clone it, or leave "
                         "--official_repo and $NTKCL_OFFICIAL_REPO empty to skip that section")
  try:
    re.compile(a.rerun)
  except re.error as e:
    raise cli.InputError(f"--rerun={a.rerun!r} is not a regular expression ({e})") from e
  py = sys.executable
  sections = []
  if a.official_repo:
    sections.append((THEIRS, [py, "benchmarks/official_torch_step.py",
                              f"--official_repo={a.official_repo}", "--batch=8",
                              f"--steps={max(a.steps, 4)}"]))
  sections.append((OURS, [py, "benchmarks/train_step.py", "--model=ViT-B/16", "--batch=8",
                          f"--steps={max(a.steps, 4)}", "--variant=official"]))
  for model in a.models.split(","):
    for variant in ("official", "corrected"):
      cmd = [py, "benchmarks/train_step.py", f"--model={model}", f"--batch={a.batch}",
             f"--steps={a.steps}", f"--variant={variant}"]
      sections.append((f"Training step: {model}, {variant}", cmd))
  big = a.models.split(",")[-1]
  sections.append((f"Where the time goes: {big}, batch {a.batch}, official",
                   [py, "benchmarks/train_step.py", f"--model={big}", f"--batch={a.batch}",
                    "--steps=1", "--profile"]))
  sections.append(("Batched (vmap) prompt sets against one-by-one passes",
                   [py, "benchmarks/branches.py", f"--models={a.models}", f"--batch={a.batch}",
                    "--steps=2"]))
  sections.append(("Input pipeline at 224 px", [py, "benchmarks/input_pipeline.py"]))
  sections.append(("Empirical NTK: joint kernel of 5 tasks x 64 images, tiny config",
                   [py, "-m", "ntk_analysis.benchmark", "--tasks=5", "--n=64",
                    "--skip=jax:ntvp:1,neural_tangents:jacobian:2"]))
  sections.append(("Compute policy: float32 against bfloat16, einsum against fused attention, "
                   "remat", [py, "benchmarks/precision.py", "--accuracy_seeds=0,1,2,3,4"]))
  sections.append(("Host syncs per step", [py, "benchmarks/host_sync.py"]))
  sections.append(("Empirical NTK across devices: joint kernel of 5 tasks x 64 images, tiny "
                   "config", [py, "-m", "ntk_analysis.benchmark", "--device_counts=1,2,4,8"]))
  sections.append(("Empirical NTK: memory estimate against measured peak",
                   [py, "-m", "ntk_analysis.benchmark", "--memory=activations,tiny",
                    "--device_counts=1,8"]))
  flag = f" --official_repo={a.official_repo}" if a.official_repo else ""
  lines = [f"# Speed benchmarks (regenerated by `python benchmarks/report.py{flag}`)", "",
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
           "what splitting costs, not the speed-up of real accelerators. Sections rerun with "
           "`--rerun` carry their own date under their output.", ""]
  keep = existing_sections(a.output) if a.rerun else {}
  body = []
  for title, cmd in sections:
    if title in keep and not re.search(a.rerun, title):
      body += [f"## {title}"] + keep[title]
      continue
    print("running:", " ".join(cmd[1:]), flush=True)
    out, secs = run(cmd)
    body += [f"## {title}", "", "```", "$ python " + " ".join(cmd[1:]), out, "```",
             f"({secs:.0f} s wall, {datetime.date.today().isoformat()})", ""]
    write(a.output, lines, body)  # after every section: nothing lost on a crash
  write(a.output, lines, body)
  print(f"wrote {a.output}")


if __name__ == "__main__":
  main()
