"""The study's robustness, delayed-Hessian, GNB-rate and first-steps tables:
what they compute from a results file, against sums done by hand, and the
pieces of the runs (the clip counter, Signum)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.study import delayed
from benchmarks.study import first_steps
from benchmarks.study import gnb_rate
from benchmarks.study import robustness as rb


def _runs(metrics, diverged=()):
  return [{"seed": s, "metric": m, "diverged": s in diverged,
           "final_train_loss": 0.1} for s, m in enumerate(metrics)]


def _data():
  """Two configurations, three seeds, 1x and 10x."""
  return {"task": "t", "metric": "test acc %", "multipliers": ["1", "10"],
          "configs": {
              "AdamW": {"tuned_lr": 0.01, "runs": {
                  "1": _runs([97.0, 98.0, 96.0]),
                  "10": _runs([96.0, 98.0, 95.0])}},
              "AdaHessian": {"tuned_lr": 0.316, "runs": {
                  "1": _runs([98.0, 97.0, 99.0]),
                  "10": _runs([10.0, 90.0, 97.0], diverged=(0,))},
                             "clip_share": {"1": {"run": 0.25,
                                                  "last_epoch": 0.031}}}}}


def test_accuracy_lost_is_paired_by_seed():
  data = _data()
  assert rb.lost(data, "AdamW", "10") == [-1.0, 0.0, -1.0]
  assert rb.lost(data, "AdaHessian", "10") == [-88.0, -7.0, -2.0]
  table = rb.lost_table(data).split("\n")
  # mean -31.0, sample std of (-88, -7, -2): sqrt(((57)^2+24^2+29^2)/2)
  std = np.std([-88.0, -7.0, -2.0], ddof=1)
  assert table[3] == (f"| AdaHessian | 0.316 | 98.00 ± 1.00 | -32.3 ± "
                      f"{std:.1f} (1/3 failed) |")
  assert table[2] == "| AdamW | 0.01 | 97.00 ± 1.00 | -0.7 ± 0.6 |"


def test_against_adamw_and_values():
  data = _data()
  row = rb.vs_adamw_table(data).split("\n")[2]
  a, b = [10.0, 90.0, 97.0], [96.0, 98.0, 95.0]
  se = np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 3)
  assert row == f"| AdaHessian | +1.0 ± {np.sqrt(2 / 3):.1f} | " \
                f"{np.mean(a) - np.mean(b):+.1f} ± {se:.1f} |"
  values = rb.values(data)
  assert values["lost_10x:AdaHessian"] == "32.3"
  assert values["change_10x:AdamW"] == "-0.7"
  assert values["failed_10x:AdaHessian"] == "1/3"
  assert values["clipped_1x:AdaHessian"] == "25%"
  assert values["clipped_last_1x:AdaHessian"] == "3%"
  assert values["holds_up"] == "none"
  assert rb.holds_up(data, "AdamW")


def test_count_clipped_counts_entries_above_the_threshold():
  tx = rb.count_clipped(0.5)
  updates = {"a": jnp.array([0.1, -0.7, 0.5]), "b": jnp.array([[2.0, 0.0]])}
  state = tx.init(updates)
  out, state = tx.update(updates, state)
  out, state = tx.update(jax.tree.map(lambda u: 0 * u, updates), state)
  jax.tree.map(np.testing.assert_array_equal, out,
               jax.tree.map(lambda u: 0 * u, updates))
  assert float(state.clipped) == 2.0 and float(state.total) == 10.0


@pytest.mark.standard_promotion  # optax.ema's debiasing
def test_signum_is_the_sign_of_the_debiased_average():
  g1, g2 = jnp.array([1.0, -2.0, 0.5]), jnp.array([-3.0, 1.0, 0.5])
  tx = rb.signum(0.1, weight_decay=0.0)
  params = jnp.zeros(3)
  state = tx.init(params)
  _, state = tx.update(g1, state, params)
  u, _ = tx.update(g2, state, params)
  m = 0.9 * 0.1 * np.asarray(g1) + 0.1 * np.asarray(g2)  # then debiased
  np.testing.assert_array_equal(u, -0.1 * np.sign(m))


def test_delayed_table_and_counts():
  runs = {}
  for clip in ("", ", clip_threshold=0.1", ", clip_threshold=0.01"):
    for k in delayed.KS:
      runs[f"k={k}{clip}"] = _runs([98.0, 97.0, 96.0],
                                   diverged=(0,) if k > 2 and not clip
                                   else ())
  data = {"task": "CNN", "lr": 0.316, "ks": list(delayed.KS), "runs": runs}
  values = delayed.values(data)
  assert values["failed_no_clip_k>1"] == "3"
  assert values["failed_clip_0.1_k>1"] == "0"
  assert values["failed:k=3"] == "1 of 3"
  row = delayed.delayed_table(data).split("\n")[2]
  assert row.startswith("| AdaHessian | 97.00 ± 1.00 | 97.00 ± 1.00 | "
                        "97.00 ± 1.00 (1/3 failed) |")


def test_gnb_tables():
  data = {"hutchinson_lr": 0.316, "factors": ["1", "0.03333"],
          "scale": [{"step": 0, "median_hutchinson": 0.1,
                     "median_gnb": 0.002, "median_ratio": 50.0,
                     "gnb_below_eps": 0.25},
                    {"step": 9, "median_hutchinson": 0.01,
                     "median_gnb": 1e-6, "median_ratio": 12588.0,
                     "gnb_below_eps": 1.0}],
          "configs": {"AdaHessian-GNB": {
              "tuned_lr": 0.01,
              "at_factor": {"1": _runs([10.0, 9.0], diverged=(0, 1)),
                            "0.03333": _runs([97.0, 98.0])},
              "at_tuned": _runs([97.0, 98.0])}}}
  values = gnb_rate.values(data)
  assert values["ratio_min"] == "50" and values["ratio_max"] == "13,000"
  assert values["tuned_factor:AdaHessian-GNB"] == "1/32"
  assert values["largest_ok:AdaHessian-GNB"] == "1/30"
  assert gnb_rate.rate_table(data).split("\n")[2] == (
      "| AdaHessian-GNB | 9.5 ± 0.7 (2/2 failed) | 97.5 ± 0.7 | "
      "0.01: 97.5 ± 0.7 |")


def test_first_steps_tables():
  run = lambda peak, acc: {"train_loss_first": [2.3, 2.3 * peak] + [2.0] * 10,  # noqa: E731
                           "peak_ratio": peak, "test_acc": acc,
                           "diverged": False}
  data = {"steps": 1200, "settings": {"A": [run(1.0, 98.0), run(3.0, 99.0)]}}
  assert first_steps.outcome_table(data).split("\n")[2] == (
      "| A | 1 – 3 | 98.50 ± 0.71 |")
  assert first_steps.values(data) == {"peak_max:A": "3", "acc:A": "98.50"}
  assert first_steps.first_steps_table(data).split("\n")[2].startswith(
      "| A | 2.3 | 4.6 |")


@pytest.mark.slow
def test_quick_runs(run_script, tmp_path):
  """The scripts end to end, tiny: robustness, then gnb_rate on its file."""
  run_script("-m", "benchmarks.study.robustness", "--quick", "--out",
             str(tmp_path), "--no-progress")
  run_script("-m", "benchmarks.study.gnb_rate", "--quick", "--out",
             str(tmp_path))
  import json  # pylint: disable=import-outside-toplevel
  data = json.loads((tmp_path / "robustness_tanh_mlp.json").read_text())
  assert set(data["configs"]) == {"AdamW", "AdaHessian"}
  gnb = json.loads((tmp_path / "gnb_digits_cnn.json").read_text())
  assert all(r["median_ratio"] > 1 for r in gnb["scale"])
