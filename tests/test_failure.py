"""benchmarks/study/failure.py: its measurements against NumPy, a tiny run."""

import math
import os

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

# pylint: disable=wrong-import-position
from benchmarks.study import failure  # noqa: E402
from benchmarks.study import tasks as st  # noqa: E402

QUAD = st.Quadratic("quadratic, axis-aligned", False, True)


def test_masked_quantiles_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.lognormal(size=1001).astype(np.float32)
  mask = rng.random(1001) < 0.7
  qs = [1e-3, 1e-2, 0.5, 0.999]
  got = failure.masked_quantiles(x, mask, qs)
  np.testing.assert_allclose(got, np.quantile(x[mask], qs), rtol=1e-5)


def _state_after(opt, steps: int, lr: float):
  """A `_Run` on the quick quadratic and its state after `steps` updates."""
  # pylint: disable-next=protected-access
  run = failure._Run(QUAD, opt, lr, 0, failure.QUICK)
  params = QUAD.init(0)
  state = opt.make(QUAD, run.schedule, 0).init(params)
  for t in range(1, steps + 1):
    params, state, _, updates = run.step(params, state, run.batch(t),
                                              np.float32(lr))
  return run, params, state, updates


@pytest.mark.standard_promotion  # optax's schedules, adam's bias correction
@pytest.mark.parametrize("opt", failure.OPTS, ids=lambda o: o.label)
def test_measurement_matches_numpy(opt):
  lr, t = failure.TUNED[QUAD.name][opt.label], 12
  run, params, state, updates = _state_after(opt, t, lr)
  run.measure(t, params, state, updates)
  m = run.records[-1]
  # The denominator by hand from the state: sqrt(bias-corrected nu) + eps.
  inner = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: hasattr(s, "nu")) if hasattr(s, "nu")][0]
  count = int(getattr(inner, "hessian_count", inner.count))
  nu = np.asarray(inner.nu["w"], np.float64) / (1 - failure.B2 ** count)
  d = np.sqrt(nu) + failure.EPS[opt.family]
  # λmax(P^-1/2 H P^-1/2) with the batch's exact Hessian X^T X / n.
  x = np.asarray(run.batch(t)[0], np.float64)
  h = x.T @ x / len(x)
  lam = np.linalg.eigvalsh(h / np.sqrt(np.outer(d, d)))[-1]
  assert m["converged"]
  assert m["lam"] == pytest.approx(lam, rel=1e-4)
  eta = lr * float(run.schedule(t))
  assert m["eta"] == pytest.approx(eta)
  assert m["ratio"] == pytest.approx(lam * eta / 38, rel=1e-4)
  assert m["threshold"] == pytest.approx(38 / eta)
  # Every coordinate of the quadratic has a gradient: all are active.
  assert m["inactive"] == 0
  q = np.quantile(d, [1e-3, 1e-2, 0.5])
  np.testing.assert_allclose([m["d_q001"], m["d_q01"], m["d_median"]], q,
                             rtol=1e-5)
  assert m["d_min"] == pytest.approx(d.min(), rel=1e-5)
  eps = failure.EPS[opt.family]
  assert m["d_small"] == pytest.approx(np.mean(d < 10 * eps))
  # The step taken: lr |u|.
  s = lr * np.abs(np.asarray(updates["w"], np.float64))
  assert m["s_max"] == pytest.approx(s.max(), rel=1e-5)
  assert m["s_q999"] == pytest.approx(np.quantile(s, 0.999), rel=1e-5)
  assert m["leaf_rms"] == pytest.approx([np.sqrt(np.mean(s ** 2))], rel=1e-5)
  # 50 coordinates: the top 0.1% is the largest step alone.
  assert m["d_at_s_max"] == pytest.approx(d[np.argmax(s)], rel=1e-5)
  assert m["d_median_top"] == m["d_at_s_max"]
  assert m["top_small"] == float(d[np.argmax(s)] < 10 * eps)
  # The top eigenvector: unit norm, all of it on the one leaf.
  assert m["leaf_mass"] == pytest.approx([1.0], rel=1e-4)
  assert 0 < m["v_peak"] <= 1


@pytest.mark.standard_promotion
def test_run_reproduces_run_functional():
  opt, lr = failure.OPTS[0], failure.TUNED[QUAD.name]["AdaHessian"]
  ours = failure.run_one(QUAD, opt, 1, 0, failure.QUICK)
  theirs = st.run_functional(QUAD, opt, lr, 0, "test")
  np.testing.assert_allclose(ours["train_loss"], theirs["train_loss"],
                             rtol=1e-4)
  assert ours["diverged"] == theirs["diverged"] is False
  assert ours["blow_up"] is None
  assert ours["metric"] == pytest.approx(theirs["metric"][-1], abs=1e-3)
  steps = [m["step"] for m in ours["measurements"]]
  assert steps == sorted(steps) and steps[0] == 1
  assert steps[-1] == ours["steps"] == 160
  assert ours["warmup"] == 8 and 8 in steps


def test_summary_of_a_blow_up():
  """A hand-made run: the blow-up, the first crossing, the maximum before."""
  def record(step, ratio, d_min):
    return {"step": step, "replay": False, "ratio": ratio, "lam": 38 * ratio,
            "d_min": d_min, "d_q001": d_min, "d_q01": d_min, "d_median": 1.0,
            "d_small": 0.0, "inactive": 0.0, "s_max": 1 / d_min,
            "s_q999": 0.5, "leaf_rms": [0.1, 0.3], "d_at_s_max": d_min,
            "d_median_top": d_min, "top_small": 0.0, "leaf_mass": [0.9, 0.1],
            "v_peak": 0.5, "d_at_v_peak": d_min}
  run = {"blow_up": 4, "warmup": 2, "diverged": True, "metric": math.nan,
         "leaves": ["['a']", "['b']"],
         "measurements": [record(1, 0.5, 0.1), record(2, 0.9, 0.01),
                          record(3, 1.5, 0.001), record(5, 9.0, 1e-4)]}
  s = failure.summary(run)
  assert (s["blow_up"], s["first_cross"]) == (4, 3)
  assert s["max_ratio"] == 1.5 and s["late_max_ratio"] == 1.5
  assert s["ratio_warmup"] == 0.9 and s["late_above"] == 0.5
  assert s["d_min"] == 0.001 and s["s_max"] == pytest.approx(1000)
  assert s["worst_leaf"] == "b" and s["top_d_ratio"] == 0.01
  assert (s["sharp_leaf"], s["sharp_d"]) == ("a", 0.001)  # at step 3


@pytest.mark.standard_promotion
def test_quick_main_caches_and_reports(tmp_path, capsys):
  out = str(tmp_path)
  text = failure.main(["--quick", "--tasks", "quadratic", "--out", out])
  names = sorted(os.listdir(out))
  assert len(names) == 5 and "tables.md" in names  # 2 optimizers x 2 rates
  assert "quadratic-axis-aligned-adahessian_10x_seed0.json" in names
  for header in ("### Stability", "### Denominator", "### Does λ_P",
                 "### The measurements up to", "### What the sharpest"):
    assert header in text
  assert text.count("| quadratic, axis-aligned | Adam | 1x |") == 3
  run = failure.load(os.path.join(
      out, "quadratic-axis-aligned-adahessian_10x_seed0.json"))
  assert run["multiplier"] == 10 and len(run["measurements"]) >= 10
  capsys.readouterr()
  assert failure.main(["--quick", "--tasks", "quadratic", "--out", out]) \
      == text  # from the cache
  assert ".json:" not in capsys.readouterr().out
