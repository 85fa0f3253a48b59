"""The learning rate AdaHessian needs with the Gauss-Newton-Bartlett estimate.

``aho.adahessian(lr, estimator=aho.gnb_estimator(key))`` at the learning
rates tuned for Hutchinson's estimate trains nothing on the digits CNN: the
loss stays near ln 10, without a NaN. This script measures why and what rate
it needs, on the two tasks of ``benchmarks/study/robustness.py`` (the tanh
MLP and the main job's CNN, 20 epochs of batch 64, warmup and cosine):

* **the scale**: along a Hutchinson AdaHessian run at its tuned rate, at the
  first step, the end of warmup, mid-run and the end, the denominator each
  estimator gives AdaHessian on a batch, per coordinate: the root mean
  square over 16 draws of the spatially averaged ``|diag estimate|`` (what
  ``sqrt(nu_hat)`` tends to). Hutchinson's ``|z * Hz|`` has the size of a
  row of the Hessian, ``sqrt(sum_j H_ij^2)``; the GNB estimate ``N g * g``
  has mean ``diag(G)``. Their ratio is how much larger a GNB step is;
* **the rate**: GNB runs at Hutchinson's tuned rate times 1, 1/3, ... 1/1000
  (5 seeds, test split), with and without ``clip_threshold=0.1``; and GNB's
  own tuned rate (the study's protocol, validation data), with and without
  the clip.

From the repository root (about 15 minutes on a loaded 2-core machine, after
``benchmarks.study.robustness``, whose tuned rates it reads and whose run
cache it shares)::

    python -m benchmarks.study.gnb_rate
    python -m benchmarks.study.gnb_rate --quick --out /tmp/r   # seconds

It writes ``docs/results/gnb_<task>.json``.
"""

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_optax as aho
from adahessian_optax.optimizer import _spatial as aho_spatial
from benchmarks.common import report
from benchmarks.common import timing
from benchmarks.study import robustness as rb
from benchmarks.study import run as study_run
from examples import digits

FACTORS = (1.0, 1 / 3, 0.1, 1 / 30, 0.01, 1 / 300, 0.001)
DRAWS = 16


def configs(task_name: str, quick: bool = False) -> list:
  """AdaHessian with the GNB estimate, with and without the clip."""
  wd = 5e-4 if task_name == "digits CNN" else 1e-4
  grid = (-10, 0) if not quick else (-4, -3)
  return [rb.Config("AdaHessian-GNB", "adahessian", grid,
                    (("curvature", "gnb"),), wd),
          rb.Config("AdaHessian-GNB, clip_threshold=0.1", "adahessian", grid,
                    (("clip_threshold", 0.1), ("curvature", "gnb")), wd)]


# ---------------------------------------------------------------------------
# The scale of the two estimates along a Hutchinson run.


def _averaged(diagonal, rules):
  return [jnp.abs(d) if r is None else r.apply(jnp.abs(d))
          for d, r in zip(jax.tree.leaves(diagonal), rules)]


def _denominators(logits_fn, params, y, rules):
  """Per leaf, the RMS over `DRAWS` draws of each estimator's averaged
  |diagonal|: `(hutchinson, gnb)`; `logits_fn` maps params to the batch's
  logits, `y` are its labels."""
  rules = aho_spatial.resolve_rules(rules, params)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      logits_fn(p), y).mean()
  ggn = aho.ggn(logits_fn, aho.SoftmaxCrossEntropy(y))

  @jax.jit
  def measure(params):
    def draw(key):
      h = aho.hutchinson_diagonal(loss, params, key).diagonal
      g = aho.gnb_diagonal(ggn, params, key).diagonal
      return _averaged(h, rules), _averaged(g, rules)
    h, g = jax.vmap(draw)(jax.random.split(jax.random.key(7), DRAWS))
    rms = lambda xs: [jnp.sqrt(jnp.mean(v ** 2, axis=0)) for v in xs]  # noqa: E731
    return rms(h), rms(g)
  return measure(params)


def _scale_record(step, names, h, g, eps=1e-4) -> dict:
  h = [np.asarray(v, np.float64).ravel() for v in h]
  g = [np.asarray(v, np.float64).ravel() for v in g]
  ratio = lambda a, b: a[b > 0] / b[b > 0]  # noqa: E731
  all_h, all_g = np.concatenate(h), np.concatenate(g)
  return {
      "step": step,
      "median_ratio": float(np.median(ratio(all_h, all_g))),
      "per_leaf": {n: float(np.median(ratio(a, b)))
                   for n, a, b in zip(names, h, g)},
      "median_hutchinson": float(np.median(all_h)),
      "median_gnb": float(np.median(all_g)),
      "gnb_below_eps": float(np.mean(all_g < eps)),
      "hutchinson_below_eps": float(np.mean(all_h < eps))}


def _names(params) -> list:
  return [".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def scale(task, lr: float, seed: int) -> list:
  """The denominators along a Hutchinson AdaHessian run of `task` at `lr`:
  at the first step, the end of warmup (one epoch), mid-run and the end."""
  config = next(c for c in rb.configs(task.name) if c.label == "AdaHessian")
  steps = rb.steps_of(task)
  out = []

  def measure(t, params, opt_state, batch, model):
    del opt_state
    x, y = batch
    if model is None:
      logits, rules = (lambda p: task.logits(p, x)), None
    else:
      logits = aho.nnx_value_fn(lambda m, x: m(x), model, x)
      rules = digits.cnn_rules()
    h, g = _denominators(logits, params, y, rules)
    out.append(_scale_record(t, _names(params), h, g))

  rb.trajectory(task, lambda s: config.make(task, s, seed), lr, seed,
                {0, steps // 20, steps // 2, steps}, measure)
  return out


# ---------------------------------------------------------------------------
# The rates.


def run_task(task, out: str, hutchinson_lr: float, quick: bool) -> dict:
  cache = study_run.Cache(out, quick)
  seeds = rb.TEST_SEEDS[:2] if quick else rb.TEST_SEEDS
  protocol = study_run.Protocol(rb.TUNE_SEEDS[:1] if quick else rb.TUNE_SEEDS,
                                seeds, seeds, grid_points=2 if quick else 0)
  factors = FACTORS[:2] if quick else FACTORS
  result = {}
  for config in configs(task.name, quick):
    tuned = study_run.tune(cache, task, config, protocol, _NoBar())
    at = {f"{f:.4g}": [rb.final(cache.run(task, config, f * hutchinson_lr,
                                          s, "test")) for s in seeds]
          for f in factors}
    at_tuned = [rb.final(cache.run(task, config, tuned["lr"], s, "test"))
                for s in seeds]
    result[config.label] = {
        "tuned_lr": tuned["lr"], "edge": tuned["edge"],
        "grid": {f"{lr:g}": s for lr, s in tuned["grid"].items()},
        "at_factor": at, "at_tuned": at_tuned}
  return {"task": task.name, "hutchinson_lr": hutchinson_lr,
          "factors": [f"{f:.4g}" for f in factors],
          "test_seeds": list(seeds), "draws": DRAWS,
          "script": "python -m benchmarks.study.gnb_rate",
          "machine": timing.header(), "configs": result,
          "scale": scale(task, hutchinson_lr, 0)}


class _NoBar:
  def update(self, n):
    pass


# ---------------------------------------------------------------------------
# Tables, each a function of one results file.


def _cell(runs: list) -> str:
  values = [r["metric"] for r in runs]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  bad = sum(r["diverged"] for r in runs)
  return (f"{statistics.mean(values):.1f} ± {spread:.1f}"
          + (f" ({bad}/{len(runs)} failed)" if bad else ""))


def _factor(f: str) -> str:
  x = float(f)
  return "1" if x == 1 else f"1/{round(1 / x)}"


def rate_table(data: dict) -> str:
  """Test accuracy of AdaHessian-GNB at fractions of Hutchinson's tuned
  rate, and at its own tuned rate."""
  rows = []
  for label, c in data["configs"].items():
    rows.append([label] + [_cell(c["at_factor"][f]) for f in data["factors"]]
                + [f"{c['tuned_lr']:.3g}: {_cell(c['at_tuned'])}"])
  return report.table(
      [f"test acc % at Hutchinson's rate ({data['hutchinson_lr']:.3g}) x"]
      + [_factor(f) for f in data["factors"]]
      + ["its own tuned rate: test acc %"], rows)


def scale_table(data: dict) -> str:
  """The two estimators' denominators along a Hutchinson run."""
  rows = []
  for r in data["scale"]:
    rows.append([r["step"], f"{r['median_hutchinson']:.3g}",
                 f"{r['median_gnb']:.3g}", f"{r['median_ratio']:.3g}",
                 f"{100 * r['gnb_below_eps']:.0f}%"])
  return report.table(
      ["step", "Hutchinson: median RMS \\|D\\|", "GNB: median RMS D",
       "median ratio Hutchinson / GNB", "GNB's D below eps = 1e-4"], rows)


def values(data: dict) -> dict:
  """Numbers quoted in the prose."""
  out = {"hutchinson_lr": f"{data['hutchinson_lr']:.3g}"}
  ratios = [r["median_ratio"] for r in data["scale"]]
  two = lambda x: f"{float(f'{x:.2g}'):,.0f}"  # noqa: E731
  out["ratio_min"] = two(min(ratios))
  out["ratio_max"] = two(max(ratios))
  for label, c in data["configs"].items():
    out[f"tuned_lr:{label}"] = f"{c['tuned_lr']:.3g}"
    out[f"tuned_factor:{label}"] = (
        f"1/{data['hutchinson_lr'] / c['tuned_lr']:.0f}")
    ok = [f for f in data["factors"]
          if not any(r["diverged"] for r in c["at_factor"][f])]
    out[f"largest_ok:{label}"] = _factor(max(ok, key=float)) if ok else "none"
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=os.path.join("results", "study",
                                                    "robustness"),
                      help="the run cache (robustness.py's by default)")
  parser.add_argument("--results", default=None,
                      help="where the results files are read and written "
                           "(default docs/results; with --quick, --out)")
  args = parser.parse_args(argv)
  results = args.results or (args.out if args.quick else rb.RESULTS)
  print(timing.header(), flush=True)
  for task in rb.tasks(args.quick):
    path = os.path.join(results, f"robustness_{rb.slug(task.name)}.json")
    with open(path) as f:
      hutchinson_lr = json.load(f)["configs"]["AdaHessian"]["tuned_lr"]
    data = run_task(task, args.out, hutchinson_lr, args.quick)
    report.save_json(os.path.join(results, f"gnb_{rb.slug(task.name)}.json"),
                     data)
    print(f"\n{task.name}")
    print(scale_table(data))
    print()
    print(rate_table(data))
    print(values(data))


if __name__ == "__main__":
  main()
