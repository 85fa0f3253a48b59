"""The examples run end to end (``--smoke``), so that they cannot rot."""

import json
import math

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

# Each example runs in a process of its own, compiling its whole program:
# 11 to 51 s each on 2 cores (2026-12-05).
pytestmark = pytest.mark.slow


@pytest.fixture
def smoke(run_script, tmp_path):
  """`smoke(script)` runs examples/`script` with --smoke, writing into
  tmp_path, and returns its stdout."""
  return lambda script: run_script(f"examples/{script}", "--smoke",
                                   "--no-progress", "--out", str(tmp_path))


def test_digits_smoke(smoke, tmp_path):
  stdout = smoke("digits.py")
  assert "| AdaHessian |" in stdout and "| Adam |" in stdout
  assert (tmp_path / "digits_loss.png").stat().st_size > 10_000
  results = json.loads((tmp_path / "digits_results.json").read_text())
  assert [r["name"] for r in results] == ["AdaHessian", "Adam"]
  for r in (x for o in results for x in o["runs"] + o["larger_runs"]):
    assert r["finite"] and len(r["train_loss"]) == 4
    assert 0.0 <= r["test_acc"][-1] <= 1.0


def test_char_lm_smoke(smoke, tmp_path):
  stdout = smoke("char_lm.py")
  assert "| AdaHessian |" in stdout and "| AdamW |" in stdout
  assert (tmp_path / "char_lm_loss.png").stat().st_size > 10_000
  results = json.loads((tmp_path / "char_lm_results.json").read_text())
  for r in results:
    assert r["finite"] and len(r["train_loss"]) == 6
    # Better than uniform guessing over the vocabulary is not asked of six
    # steps; the loss must just be a finite cross-entropy.
    assert 0.0 < r["final_val_loss"] < 10.0


def test_hessian_spectrum_smoke(smoke, tmp_path):
  stdout = smoke("hessian_spectrum.py")
  assert "| initialisation |" in stdout and "| AdaHessian |" in stdout
  for plot in ("hessian_esd.png", "hessian_top_eigenvalue.png"):
    assert (tmp_path / plot).stat().st_size > 10_000
  rows = json.loads((tmp_path / "hessian_spectrum.json").read_text())
  assert [r["name"] for r in rows] == ["initialisation", "Adam", "AdamW",
                                       "AdaHessian"]
  for r in rows:
    assert r["top3"][0] >= r["top3"][1] >= r["top3"][2] > 0
    assert r["trace_stderr"] > 0
    weights = [sum(w) for w in r["esd_weights"]]
    assert all(abs(w - 1) < 1e-4 for w in weights)
  for r in rows[1:]:
    assert len(r["track_top"]) == len(r["track_steps"]) >= 2
    assert all(t > 0 for t in r["track_top"])
    assert 0.0 <= r["test_acc"] <= 1.0


def test_equinox_cnn_smoke(smoke, tmp_path):
  pytest.importorskip("equinox")
  stdout = smoke("equinox_cnn.py")
  assert "| AdaHessian |" in stdout and "| AdamW |" in stdout
  assert (tmp_path / "equinox_cnn_loss.png").stat().st_size > 10_000


def test_landscape_smoke(smoke, tmp_path):
  stdout = smoke("landscape.py")
  assert "top eigenvalues:" in stdout
  for plot in ("landscape_1d.png", "landscape_2d.png"):
    assert 10_000 < (tmp_path / plot).stat().st_size < 150_000
  r = json.loads((tmp_path / "landscape.json").read_text())
  assert r["eigenvalues"][0] >= r["eigenvalues"][1] > 0
  assert len(r["loss_along_v1"]) == len(r["alphas"]) == 11
  assert all(math.isfinite(v) for row in r["plane"] for v in row)
  # The curve's minimum over the grid is at most its value at 0.
  assert min(r["loss_along_v1"]) <= r["loss_along_v1"][5]


def test_sharpness_smoke(smoke, tmp_path):
  stdout = smoke("sharpness.py")
  assert "| Adam |" in stdout and "| AdaHessian |" in stdout
  assert 10_000 < (tmp_path / "sharpness.png").stat().st_size < 200_000
  r = json.loads((tmp_path / "sharpness.json").read_text())
  assert [x["name"] for x in r["trajectories"]] == [
      "Adam", "Adam", "AdaHessian", "AdaHessian"]
  for run in r["trajectories"]:
    assert len(run["points"]) >= 2
    for p in run["points"]:
      assert p["sharpness"] > 0 and p["preconditioned"] > 0
      assert p["sharpness_products"] >= 1
      # Warm and cold starts agree once untrustworthy stops are redone.
      for kind in ("sharpness", "preconditioned"):
        assert p[kind] == pytest.approx(p[f"{kind}_cold"], rel=0.1)
  for c in r["cost"]:
    assert c["calls"] >= 2 and c["plain_s"] > 0 and c["tracked_s"] > 0


def test_hawq_smoke(smoke, tmp_path):
  stdout = smoke("hawq.py")
  assert "| HAWQ-V2 (average trace) |" in stdout
  r = json.loads((tmp_path / "hawq.json").read_text())
  (seed,) = r["seeds"]
  assert sorted(seed["mean_trace"]) == ["conv1", "conv2", "dense1", "dense2"]
  assert sorted(seed["budgets"]) == ["3.0", "4.0"]
  at4 = seed["budgets"]["4.0"]
  assert at4["allocations"]["uniform 4 bits"]["bits"] == [4, 4, 4, 4]
  for a in at4["allocations"].values():
    assert a["avg_bits"] <= 4 and 0.0 <= a["test_acc"] <= 1.0
    assert 1 <= a["rank"] <= len(at4["feasible"])
