"""The study (benchmarks/study): its protocol helpers and a --quick run."""

import json
import math
import re

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

# pylint: disable=wrong-import-position
from benchmarks.study import report as study_report  # noqa: E402
from benchmarks.study import run as study  # noqa: E402


@pytest.fixture
def quick_study(run_script):
  """`quick_study(*args)` runs the study with --quick; returns its stdout."""
  return lambda *args: run_script("-m", "benchmarks.study.run", "--quick",
                                  "--no-progress", *args, timeout=900)


def test_score_and_divergence():
  run = {"eval_loss": [1.0, 0.5, 0.2], "train_loss": [2.3, 1.0, 0.1],
         "final_train_loss": 0.1}
  assert study.score([run, run]) == pytest.approx(math.log(0.35))
  # Judged from the curve: a non-finite loss, or no progress (a final loss
  # not below 90% of the first, as in a collapse to chance accuracy).
  blown_up = dict(run, train_loss=[2.3, "nan"], final_train_loss="nan")
  collapsed = dict(run, train_loss=[2.30, 2.31], final_train_loss=2.29)
  assert study.score([run, blown_up]) == math.inf
  assert study.score([run, collapsed]) == math.inf
  # A classifier at chance failed, even with a final loss below 90% of the
  # first step's.
  at_chance = dict(run, metric=[10.1], chance=10.0)
  assert study.score([run, at_chance]) == math.inf
  assert study.score([run, dict(at_chance, metric=[97.0])]) < math.inf
  assert study.lr_of(-2) == 0.1 and study.lr_of(1) == 3.162


def test_cell_counts_divergences():
  runs = [{"metric": 90.0, "diverged": False},
          {"metric": 92.0, "diverged": False},
          {"metric": 10.0, "diverged": True}]
  assert study_report.cell(runs[:2], 2) == "91.00 ± 1.41"
  assert study_report.cell(runs, 1).endswith("(1/3 div.)")
  assert study_report.cell(runs[2:], 1) == "diverged (1/1)"


@pytest.mark.slow  # the whole study, tiny, twice: about a minute
def test_quick_study_is_cached_and_reported(quick_study, tmp_path):
  stdout = quick_study("--out", str(tmp_path))
  runs = list((tmp_path / "runs").rglob("*.json"))
  assert len(runs) > 50
  done = [int(n) for n in re.findall(r"(\d+) runs done", stdout)]
  assert len(done) == 3 and all(n > 0 for n in done)
  for part in ("small", "cnn", "lm"):
    summary = json.loads((tmp_path / f"summary_{part}.json").read_text())
    assert summary["machine"].startswith("jax ")  # versions, device, flags
    for task in summary["tasks"].values():
      for result in task["optimizers"].values():
        assert result["tuned"]["lr"] > 0
        for r in result["sensitivity"]["1.0"]:
          assert math.isfinite(float(r["metric"]))
  tables = (tmp_path / "study_tables.md").read_text()
  for heading in ("Test metric at the tuned rate", "Learning-rate robustness",
                  "AdaHessian's options", "Tuning grids"):
    assert heading in tables
  assert "| AdaHessian |" in tables and "| 10x |" in tables
  assert (tmp_path / "study_lr.png").stat().st_size > 10_000

  again = quick_study("--out", str(tmp_path), "--part", "small", "cnn", "lm")
  assert re.findall(r"(\d+) runs done", again) == ["0", "0", "0"]
  assert len(list((tmp_path / "runs").rglob("*.json"))) == len(runs)


@pytest.mark.slow  # the second round, tiny: about a minute
def test_quick_second_round(quick_study, tmp_path):
  stdout = quick_study("--round", "2", "--out", str(tmp_path))
  done = [int(n) for n in re.findall(r"(\d+) runs done", stdout)]
  assert len(done) == 4 and all(n > 0 for n in done)
  for part in ("small", "cnn", "lm", "lm-large"):
    summary = json.loads((tmp_path / f"summary2_{part}.json").read_text())
    labels = {label for task in summary["tasks"].values()
              for label in task["optimizers"]}
    expected = ({"AdaHessian", "AdamW"} if part == "lm-large"
                else {"Sophia-G", "AdaHessian-GNB", "AdaHessian floor 0.1"})
    assert labels == expected
    for task in summary["tasks"].values():
      assert not task["ablations"]
      for result in task["optimizers"].values():
        assert result["tuned"]["lr"] > 0
  tables = (tmp_path / "study2_tables.md").read_text()
  assert "| Sophia-G |" in tables and "char LM, 4 layers" in tables
  # The first round's summaries are not touched.
  assert not list(tmp_path.glob("summary_*.json"))


def test_second_round_plan():
  from benchmarks.study import optimizers as so  # pylint: disable=import-outside-toplevel
  from benchmarks.study import tasks as study_tasks  # pylint: disable=import-outside-toplevel
  tasks = study_tasks.tasks(quick=False)
  plan = study.plan(tasks["cnn"][0], "cnn", 2, quick=False)
  labels = [o.label for o, _ in plan]
  assert labels[:2] == ["Sophia-G", "AdaHessian-GNB"]
  assert all(p == study.FULL for _, p in plan[:2])
  assert all(p == study.Protocol(*study.LIGHT) for _, p in plan[2:])
  large = study.plan(tasks["lm-large"][0], "lm-large", 2, quick=False)
  assert all(p == study.LARGE for _, p in large)
  # Each of the harder LM's grids is three points (extended at an edge).
  assert all(o.grid[1] - o.grid[0] == 2 for o, _ in large)
  rms = next(o for o in so.second_round()[1] if o.option("layer_rms"))
  assert rms.option("layer_rms") == 0.1


def test_floor_rule_matches_numpy():
  import numpy as np  # pylint: disable=import-outside-toplevel
  import adahessian_optax as aho  # pylint: disable=import-outside-toplevel
  from benchmarks.study import optimizers as so  # pylint: disable=import-outside-toplevel
  x = np.array([0.1, 0.3, 4.0, 0.0], np.float32)
  rule = so.FloorRule(aho.block_mean(2), 0.5)
  # Block means [0.2, 0.2, 2, 2], floored at half the leaf's mean (0.55).
  np.testing.assert_allclose(rule.apply(x), [0.55, 0.55, 2.0, 2.0],
                             rtol=1e-6)
  np.testing.assert_allclose(so.FloorRule(None, 0.5).apply(x),
                             [0.55, 0.55, 4.0, 0.55], rtol=1e-6)
