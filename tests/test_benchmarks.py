"""The speed benchmarks measure what they say: the NTK-CL step's work and the report's arithmetic."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks.*

from benchmarks import precision  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import train_step  # noqa: E402  pylint: disable=g-import-not-at-top


def test_ntkcl_step_does_the_work_of_six_forward_passes():
  """docs/method.md §1.4: 4 ViT passes per image, 2 of them with activation gradients only (backbone
  weights and frozen sets get none), so about 6 forwards; 9 or more would mean the backbone or
  the frozen sets are being differentiated, 4 that the current passes are not."""
  peak = 1e12  # only FLOP counts are compared here
  rows = train_step.run_one("tiny", 0, 0, 4, 1, "official", peak)
  step, fwd = rows[0], rows[1]
  assert step["what"].startswith("NTK-CL train step") and fwd["what"] == "reference: 1 ViT forward"
  ratio = step["flops"] / fwd["flops"]
  assert 5.0 < ratio < 7.0, ratio


def _section(title, lines):
  """A section as report.main builds it: the command's output is one multi-line string."""
  return [f"## {title}", "", "```", "\n".join(lines), "```", ""]


def test_head_to_head_table_from_benchmark_outputs(tmp_path):
  body = _section(report.THEIRS, [
      "official code: /x at abc; torch 2.14.1, 2 threads; float32 matmul throughput (2048^3, "
      "same process): 200.0 GFLOP/s",
      "   img/s   s/step     GFLOP  GFLOP/s of peak  step times (s)",
      "    0.80   10.000   1600.00    160.0   80.0%  10.00, 10.00"])
  body += _section(report.OURS, [
      "machine float32 matmul throughput (2048^3, same process): 400.0 GFLOP/s on 1 device(s)",
      "ViT-B/16 d12 224px       NTK-CL train step (official)         8     1.60    5.000   "
      "1600.00    320.0   80.0%      11.6        2294"])
  body += _section("Where the time goes: ViT-B/16, batch 8, official", [
      "ViT-B/16 d12 224px       NTK-CL train step (official)         8     1.59    5.030   "
      "1600.00    318.1   79.5%      11.6        2294"])
  page = tmp_path / "benchmarks.md"
  report.write(str(page), ["# header"], body)
  text = page.read_text()
  # 160 GFLOP/s is 80% of torch's own 200 and 40% of the best (400); ours 320 -> 80% of both
  assert "| official PyTorch (FlopCounterMode) | 0.80 | 10.00 | 1600 | 160 | 80.0% | 40.0% |" in text
  assert "| ntkcl-jax (XLA cost analysis) | 1.60 | 5.00 | 1600 | 320 | 80.0% | 80.0% |" in text
  assert "2.00x the official code" in text
  assert "| ViT-B/16 d12 224px | official | 8 | 1.60 | 5.000 | 1600.00 | 80.0% | 2294 |" in text
  assert "| 1.59 |" not in text.split("## Summary")[1].split("\n## ")[0]  # profile's row: not summed


def test_headings_printed_by_a_command_stay_inside_its_section(tmp_path):
  """--rerun keeps sections by title: a command that prints its own "## " heading (precision.py,
  host_sync.py) must not split its section in two."""
  body = _section("Host syncs per step", ["## Host syncs of the train loop", "", "| a | b |"])
  body += _section("Input pipeline at 224 px", ["12 img/s"])
  page = tmp_path / "benchmarks.md"
  report.write(str(page), ["# header"], body)
  sections = report.existing_sections(str(page))
  assert list(sections) == ["Host syncs per step", "Input pipeline at 224 px"]
  assert "## Host syncs of the train loop" in sections["Host syncs per step"]


def test_head_to_head_is_left_out_without_the_official_run():
  body = _section(report.OURS, ["machine float32 matmul throughput: 1 GFLOP/s"])
  assert report.head_to_head(body) == []


@pytest.mark.skipif(not os.environ.get("NTKCL_OFFICIAL_REPO"),
                    reason="set NTKCL_OFFICIAL_REPO to a checkout of Programmergg/NTK-CL (and "
                           "install the parity extra) to time the official PyTorch step")
def test_official_torch_step_runs_the_official_loop():
  from benchmarks import official_torch_step  # pylint: disable=g-import-not-at-top
  out = official_torch_step.main([f"--official_repo={os.environ['NTKCL_OFFICIAL_REPO']}",
                                  "--batch=2", "--steps=1"])
  # the official step is the same work as ours: about six ViT-B/16 forwards (35.1 GFLOP each)
  assert 5.0 < out["flops"] / (2 * 35.1e9) < 7.0


def test_profile_accounts_for_all_op_time():
  """The per-kind shares of the traced step's op time add up to the whole, and the GEMMs are
  among the kinds found."""
  import re  # pylint: disable=g-import-not-at-top
  vcfg = train_step.vit_config("tiny", 0, 0)
  jitted, args, carry = train_step.ntkcl_step(vcfg, 4, "official")
  lines = train_step.profile_step(jitted, args, carry)
  if lines[0].startswith("(no trace"):
    pytest.skip(lines[0])
  start = lines.index(next(l for l in lines if l.startswith("kind of op"))) + 1
  kinds = {}
  for l in lines[start:]:
    if not l.strip():
      break
    m = re.match(r"(.+?)\s+([\d.]+)\s+([\d.]+)%\s+(\d+)$", l)
    kinds[m.group(1)] = float(m.group(3))
  assert abs(sum(kinds.values()) - 100.0) < 0.5, kinds
  assert any(k.startswith("matmul") for k in kinds), kinds


@pytest.mark.parametrize("shift,verdict", [(0.05, "holds"), (-4.0, "fails")])
def test_precision_accuracy_table_pairs_runs_by_seed(monkeypatch, tmp_path, shift, verdict):
  """bf16 − f32 per seed, their mean with an interval and a verdict against ±1 point; the
  matrix column is the largest entry-wise gap (the runs themselves are whole trainings, stubbed
  here by finished results)."""
  from scripts import pages  # pylint: disable=g-import-not-at-top  # precision's path
  rng = np.random.default_rng(0)
  base = {s: 40 + rng.normal() for s in range(5)}
  noise = {s: 0.02 * (s - 2) for s in range(5)}

  def fake(dataset, method, seed, scale, workdir):
    assert dataset == "imagenette" and workdir == str(tmp_path)
    a = base[seed] + (shift + noise[seed] if method == "official_bf16" else 0.0)
    return {"avg_incremental_accuracy": a + 10, "last_accuracy": a, "wall_time_s": 100.0,
            "accuracy_matrix": [[a + 1, None], [a - 1, a]]}
  monkeypatch.setattr(pages, "finished_cell", fake)
  text = "\n".join(precision.accuracy_lines(range(5), str(tmp_path)))
  rows = [l for l in text.splitlines() if l.startswith("| ") and l[2].isdigit()]
  assert len(rows) == 5
  assert rows[3].split(" | ")[5] == f"{abs(shift + noise[3]):.2f}"  # max abs matrix diff
  want = np.mean([shift + noise[s] for s in range(5)])
  for name in ("ΔĀ", "ΔA_T"):
    line = next(l for l in text.splitlines() if l.startswith(f"- {name}: "))
    assert line.startswith(f"- {name}: {want:+.2f} [") and f"**{verdict}**" in line, line


def test_device_runs_table_compares_every_run_with_one_device():
  from benchmarks import device_runs  # pylint: disable=g-import-not-at-top
  res = lambda m: {"accuracy_matrix": m, "last_accuracy": m[-1][-1]}  # noqa: E731
  runs = [{"devices": 1, "eval_batch": 18, "code": 0, "traceback": False, "seconds": 5.0,
           "results": res([[90.0]])},
          {"devices": 3, "eval_batch": 18, "code": 0, "traceback": False, "seconds": 6.0,
           "results": res([[90.0]])},
          {"devices": 4, "eval_batch": 18, "code": 0, "traceback": False, "seconds": 6.0,
           "results": res([[80.0]])},
          {"devices": 6, "eval_batch": 18, "code": 2, "traceback": False, "seconds": 1.0,
           "stderr": "error: boom"}]
  rows = device_runs.table(runs)
  assert rows[2].startswith("| 1 | 18 | 0 | False | 90.00 | True |")
  assert "| 90.00 | True |" in rows[3] and "| 80.00 | False |" in rows[4]
  assert "error: error: boom" in rows[5] and "| n/a |" in rows[5]


def test_step_time_ratio_is_paired_within_each_round():
  """A load change that slows every setting alike in one round leaves the paired ratio alone
  (the ratio of the two medians would move); the range spans the rounds' ratios."""
  ref = [1.0, 1.0, 3.0, 1.0, 1.0]        # round 2 ran under load ...
  other = [1.1, 1.2, 3.3, 1.05, 1.15]    # ... and slowed this setting by the same factor
  med, lo, hi = precision.paired_ratio(other, ref)
  q = np.asarray(other) / np.asarray(ref)
  assert (med, lo, hi) == pytest.approx((np.median(q), q.min(), q.max()))
  assert med == pytest.approx(1.1)
  with pytest.raises(ValueError):
    precision.paired_ratio([1.0], [1.0, 2.0])
