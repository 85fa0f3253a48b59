"""Robustness to the learning rate, measured as accuracy lost.

The study (``docs/study.md``) counts the runs that fail at multiples of each
optimizer's tuned rate. A run that trains but ends several points lower is
not a failure by that count, so this script reports what the multiples cost:
the test accuracy lost at each multiple against the same seeds at the tuned
rate (1x), and the accuracy against AdamW's at the same multiple of its own
tuned rate.

Two tasks on scikit-learn's digits:

* ``tanh MLP``: a 64-128-10 tanh MLP, every optimizer with decoupled weight
  decay 1e-4 (the setting of issue 32);
* ``digits CNN``: the main job's CNN (``examples/digits.py``), each
  optimizer with the main job's weight decay.

Both train 20 epochs of batch 64 with one epoch of linear warmup and cosine
decay. Each configuration's peak rate is tuned on a half-decade grid by the
study's score (the mean over two seeds of the log validation loss, on a
validation split of the training set; never the test set), then every
multiple in ``MULTIPLIERS`` runs with seeds 0-4 on the test split. A seed
fixes the initialisation, the batch order and the probes, so the runs of one
seed at two multiples differ only by the rate, and the accuracy lost is
taken seed by seed (mean ± standard deviation over the 5 paired
differences). Failed runs (the study's rule) are counted and their accuracy
kept in the means.

From the repository root (about 20 minutes on 2 cores; resumable, every run
cached under ``results/study/robustness/``)::

    python -m benchmarks.study.robustness            # writes docs/results/
    python -m benchmarks.study.robustness --quick --out /tmp/r   # seconds

It writes ``docs/results/robustness_<task>.json``; the tables of the study
and the README are rendered from those files by the functions below
(``python -m benchmarks.common.tables --write``).
"""

import argparse
import dataclasses
import functools
import math
import os
import statistics
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import adahessian_optax as aho
from benchmarks.common import models
from benchmarks.common import report
from benchmarks.common import timing
from benchmarks.study import optimizers as so
from benchmarks.study import run as study_run
from benchmarks.study import tasks as st
from examples import digits

MULTIPLIERS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
TUNE_SEEDS, TEST_SEEDS = (100, 101), (0, 1, 2, 3, 4)
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "docs", "results")
# The options of aho.adahessian that a configuration may set.
_ADAHESSIAN_OPTIONS = ("clip_threshold", "rms_clip_threshold",
                       "hessian_power", "eps")


class TanhMLP(st.DigitsMLP):
  """A 64-128-10 tanh MLP on the flattened digits (LeCun-normal init)."""

  sizes = (64, 128, 10)

  def __init__(self, quick: bool):  # pylint: disable=super-init-not-called
    st.Functional.__init__(self, "tanh MLP", "test acc %", True,
                           2 if quick else 20)

  def init(self, seed: int):
    keys = jax.random.split(jax.random.key(seed), len(self.sizes) - 1)
    return {f"dense{i}": {
        "kernel": jax.random.normal(k, (m, n)) / np.sqrt(m),
        "bias": jnp.zeros(n)} for i, (k, m, n) in enumerate(
            zip(keys, self.sizes[:-1], self.sizes[1:]))}

  def logits(self, params, x):
    return models.mlp_logits(params, x, jnp.tanh)


@dataclasses.dataclass(frozen=True)
class Config(so.Opt):
  """An optimizer configuration built with the public API.

  ``family`` is ``"adahessian"`` (``aho.adahessian`` with ``options`` among
  ``_ADAHESSIAN_OPTIONS``, ``curvature="gnb"`` for the Gauss-Newton-Bartlett
  estimator, ``k`` to refresh the Hessian every k steps and ``warmup``, the
  fraction of warmup steps), ``"adamw"``,
  ``"adam"`` or ``"signum"`` (:func:`signum`).
  """

  weight_decay: float = 0.0

  def make(self, task, schedule, seed: int) -> optax.GradientTransformation:
    if self.family == "adahessian":
      options = {k: v for k, v in self.options if k in _ADAHESSIAN_OPTIONS}
      if self.refresh_every > 1:
        # The CNN's trainer chooses between two compiled steps on the host.
        options["update_interval"] = (None if isinstance(task, st.CNN)
                                      else self.refresh_every)
      if self.option("curvature") == "gnb":
        options["estimator"] = aho.gnb_estimator(key=seed)
      else:
        options["key"] = seed
      return aho.adahessian(schedule, weight_decay=self.weight_decay,
                            spatial_averaging=task.spatial(None), **options)
    if self.family == "adamw":
      return optax.adamw(schedule, weight_decay=self.weight_decay)
    if self.family == "adam":
      return optax.adam(schedule)
    if self.family == "signum":
      return signum(schedule, self.weight_decay)
    raise ValueError(self.family)


def signum(learning_rate, weight_decay: float) -> optax.GradientTransformation:
  """The sign of the gradient's EMA (b1 0.9, debiased), with decoupled
  weight decay: what AdaHessian's update becomes where its elementwise clip
  binds on every coordinate."""
  return optax.chain(
      optax.ema(0.9, debias=True),
      optax.stateless(lambda u, p: jax.tree.map(jnp.sign, u)),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))


_ADAPTIVE, _SECOND = (-8, -2), (-5, 1)


def configs(task_name: str, quick: bool = False) -> list:
  """The configurations of one task: AdamW and Adam, AdaHessian as the
  paper has it, and AdaHessian with each option that bounds its step."""
  cnn = task_name == "digits CNN"
  wd_adahessian, wd_adamw = (5e-4, 1e-2) if cnn else (1e-4, 1e-4)

  def adahessian(label, **options):
    return Config(label, "adahessian", _SECOND,
                  tuple(sorted(options.items())), wd_adahessian)
  if quick:
    return [Config("AdamW", "adamw", _ADAPTIVE, (), wd_adamw),
            adahessian("AdaHessian")]
  return [
      Config("AdamW", "adamw", _ADAPTIVE, (), wd_adamw),
      Config("Adam", "adam", _ADAPTIVE),
      adahessian("AdaHessian"),
      adahessian("AdaHessian, rms_clip_threshold=0.1",
                 rms_clip_threshold=0.1),
      adahessian("AdaHessian, clip_threshold=0.1", clip_threshold=0.1),
      adahessian("AdaHessian, clip_threshold=0.01", clip_threshold=0.01),
      adahessian("AdaHessian, hessian_power=0.5", hessian_power=0.5),
      Config("Signum", "signum", _ADAPTIVE, (), wd_adamw),
  ]


def tasks(quick: bool) -> list:
  return [TanhMLP(quick), st.CNN(quick)]


def slug(task_name: str) -> str:
  return task_name.lower().replace(" ", "_")


def run_task(task, out: str, quick: bool, progress: bool) -> dict:
  """Tunes every configuration and runs it at every multiple."""
  cache = study_run.Cache(out, quick)
  protocol = study_run.Protocol(TUNE_SEEDS[:1] if quick else TUNE_SEEDS,
                                TEST_SEEDS[:2] if quick else TEST_SEEDS,
                                TEST_SEEDS[:2] if quick else TEST_SEEDS,
                                grid_points=2 if quick else 0)
  multipliers = (1.0, 10.0) if quick else MULTIPLIERS
  result = {}
  bar = tqdm(desc=task.name, disable=not progress, dynamic_ncols=True)
  for config in configs(task.name, quick):
    bar.set_postfix(config=config.label)
    tuned = study_run.tune(cache, task, config, protocol, bar)
    runs = {}
    for m in multipliers:
      runs[f"{m:g}"] = [final(cache.run(task, config, m * tuned["lr"], s,
                                         "test"))
                        for s in protocol.test_seeds]
      bar.update(len(protocol.test_seeds))
    result[config.label] = {
        "tuned_lr": tuned["lr"], "edge": tuned["edge"],
        "grid": {f"{lr:g}": s for lr, s in tuned["grid"].items()},
        "options": dict(config.options), "weight_decay": config.weight_decay,
        "runs": runs}
    if config.option("clip_threshold") is not None:
      # Where the clip binds (seed 0): the share of coordinates clipped.
      result[config.label]["clip_share"] = {
          f"{m:g}": clip_share(task, config, m * tuned["lr"], 0)
          for m in (1.0, 10.0)}
  bar.close()
  return {"task": task.name, "metric": task.metric,
          "multipliers": [f"{m:g}" for m in multipliers],
          "tune_seeds": list(protocol.tune_seeds),
          "test_seeds": list(protocol.test_seeds),
          "epochs": 20 if not quick else None,
          "script": "python -m benchmarks.study.robustness",
          "machine": timing.header(),
          "minutes": cache.seconds / 60, "configs": result}


def final(r: dict) -> dict:
  """What the results file keeps of a cached run."""
  return {"seed": r["seed"], "metric": float(r["metric"][-1]),
          "diverged": bool(study_run._diverged(r)),  # pylint: disable=protected-access
          "final_train_loss": float(r["final_train_loss"])}


# ---------------------------------------------------------------------------
# One run with a look at its state along the way.


def trajectory(task, make: Callable, lr: float, seed: int, at: set,
               measure: Callable) -> None:
  """Trains `task` (test split) with ``make(schedule) -> tx`` at peak rate
  `lr` (the warmup and cosine of the runs above) and calls
  ``measure(t, params, opt_state, batch, model)`` after `t` updates for
  every `t` in `at` (`model` the NNX model for the CNN, else None; `batch`
  the next update's)."""
  if isinstance(task, st.CNN):
    _trajectory_cnn(task, make, lr, seed, at, measure)
    return
  batches = task.batches(seed, "test")
  per_chunk = batches[0].shape[1]
  steps = batches[0].shape[0] * per_chunk
  tx = make(optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps))
  params = task.init(seed)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    value_fn = functools.partial(task.loss, batch=batch)
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  for t in range(steps + 1):
    i = min(t, steps - 1)
    batch = tuple(b[i // per_chunk, i % per_chunk] for b in batches)
    if t in at:
      measure(t, params, state, batch, None)
    if t < steps:
      params, state = step(params, state, batch)


def _trajectory_cnn(task, make, lr, seed, at, measure) -> None:
  """The main job's CNN through its own train step (`digits.train`'s
  batches, schedule and loss)."""
  x_train, y_train, _, _ = task.data["test"]
  batch_size = 32 if task.quick else 64
  per_epoch = len(x_train) // batch_size
  steps = task.epochs * per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=min(per_epoch, steps // 4 + 1), decay_steps=steps)
  spec = digits.Spec("measured", lr, lambda s, _: make(s), needs_value_fn=True)
  model = digits.CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make(schedule), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  train_step = digits.make_train_step(spec, graphdef)
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(x_train))[:per_epoch
                                                         * batch_size]
                          for _ in range(task.epochs)])
  for t in range(steps + 1):
    i = order[min(t, steps - 1) * batch_size:][:batch_size]
    x, y = jnp.asarray(x_train[i]), jnp.asarray(y_train[i])
    if t in at:
      model, optimizer = nnx.merge(graphdef, state)
      measure(t, nnx.state(model, nnx.Param), optimizer.opt_state, (x, y),
              model)
    if t < steps:
      state, _ = train_step(state, x, y)


def steps_of(task) -> int:
  """The number of updates of one run of `task` (test split)."""
  if isinstance(task, st.CNN):
    return task.epochs * (len(task.data["test"][0])
                          // (32 if task.quick else 64))
  return task.chunks * (len(task.data["test"][0]) // 64)


class ClipShareState(NamedTuple):
  """Coordinates whose preconditioned update exceeded the clip, and all
  coordinates, summed over the steps so far."""

  clipped: jax.Array
  total: jax.Array


def count_clipped(threshold: float) -> optax.GradientTransformation:
  """The identity, counting in its state the entries above `threshold`."""
  def init(params):
    del params
    return ClipShareState(jnp.zeros([], jnp.float32),
                          jnp.zeros([], jnp.float32))

  def update(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    clipped = sum(jnp.sum(jnp.abs(u) > threshold).astype(jnp.float32)
                  for u in leaves)
    total = jnp.float32(sum(u.size for u in leaves))
    return updates, ClipShareState(state.clipped + clipped,
                                   state.total + total)
  return optax.GradientTransformation(init, update)


def clip_share(task, config: Config, lr: float, seed: int) -> dict:
  """The share of coordinates where `config`'s elementwise clip bound, over
  the whole run and over its last epoch, at peak rate `lr`: `config` as
  ``aho.adahessian`` builds it, with a counter before the clip."""
  threshold = config.option("clip_threshold")

  def make(schedule):
    return optax.chain(
        aho.scale_by_adahessian(key=seed,
                                spatial_averaging=task.spatial(None)),
        count_clipped(threshold), optax.clip(threshold),
        optax.add_decayed_weights(config.weight_decay),
        optax.scale_by_learning_rate(schedule))
  seen = {}

  def measure(t, params, opt_state, batch, model):
    del params, batch, model
    seen[t] = tuple(float(x) for x in jax.tree.leaves(opt_state[1]))
  steps = steps_of(task)
  last_epoch = steps - steps // 20
  trajectory(task, make, lr, seed, {last_epoch, steps}, measure)
  (c1, n1), (c2, n2) = seen[last_epoch], seen[steps]
  return {"run": c2 / n2, "last_epoch": (c2 - c1) / (n2 - n1)}


# ---------------------------------------------------------------------------
# Tables, each a function of one results file.


def _by_seed(runs: list) -> dict:
  return {r["seed"]: r for r in runs}


def lost(data: dict, label: str, m: str) -> list:
  """Per seed: the metric at multiple `m` minus the same seed's at 1x
  (negative: lost)."""
  base = _by_seed(data["configs"][label]["runs"]["1"])
  return [r["metric"] - base[r["seed"]]["metric"]
          for r in data["configs"][label]["runs"][m] if r["seed"] in base]


def _mean_std(values, digits=1) -> str:
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _failed(runs: list) -> str:
  bad = sum(r["diverged"] for r in runs)
  return f" ({bad}/{len(runs)} failed)" if bad else ""


def _others(data: dict) -> list:
  return [m for m in data["multipliers"] if m != "1"]


def lost_table(data: dict) -> str:
  """Accuracy at the tuned rate, then the points lost at each multiple
  (paired by seed: mean ± std), with the failed runs counted."""
  rows = []
  for label, c in data["configs"].items():
    runs = c["runs"]
    rows.append([label, f"{c['tuned_lr']:.3g}",
                 _mean_std([r["metric"] for r in runs["1"]], 2)]
                + [_mean_std(lost(data, label, m)) + _failed(runs[m])
                   for m in _others(data)])
  return report.table(
      ["optimizer", "tuned lr", "test acc % at 1x"]
      + [f"change at {m}x (points)" for m in _others(data)], rows)


def vs_adamw_table(data: dict) -> str:
  """Each configuration's mean accuracy minus AdamW's at the same multiple
  of each one's tuned rate, ± the standard error of that difference."""
  ref = data["configs"]["AdamW"]["runs"]
  rows = []
  for label, c in data["configs"].items():
    if label == "AdamW":
      continue
    cells = []
    for m in data["multipliers"]:
      a = [r["metric"] for r in c["runs"][m]]
      b = [r["metric"] for r in ref[m]]
      se = math.sqrt(statistics.variance(a) / len(a)
                     + statistics.variance(b) / len(b))
      cells.append(f"{statistics.mean(a) - statistics.mean(b):+.1f} "
                   f"± {se:.1f}")
    rows.append([label] + cells)
  return report.table(
      ["test acc % minus AdamW's"] + [f"{m}x" for m in data["multipliers"]],
      rows)


_SUMMARY_SKIPS = ("Adam", "AdaHessian, hessian_power=0.5")


def summary_table(data: dict) -> str:
  """The README's: accuracy at 1x and the points lost at 3x and 10x (Adam
  and ``hessian_power=0.5`` left to the study's tables)."""
  rows = []
  for label, c in data["configs"].items():
    if label in _SUMMARY_SKIPS:
      continue
    runs = c["runs"]
    rows.append([label, _mean_std([r["metric"] for r in runs["1"]], 2)]
                + [_mean_std(lost(data, label, m)) + _failed(runs[m])
                   for m in ("3", "10")])
  return report.table(["optimizer", "test acc % at its tuned rate",
                       "change at 3x (points)", "change at 10x (points)"],
                      rows)


def holds_up(data: dict, label: str, margin: float = 1.0) -> bool:
  """Whether `label` loses no more than AdamW (+ `margin` points) at every
  multiple above 1x, on average over seeds, and fails no run there."""
  for m in _others(data):
    if float(m) < 1:
      continue
    mine = statistics.mean(lost(data, label, m))
    adamw = statistics.mean(lost(data, "AdamW", m))
    if (mine < adamw - margin
        or any(r["diverged"] for r in data["configs"][label]["runs"][m])):
      return False
  return True


def values(data: dict) -> dict:
  """Numbers quoted in the prose, by name: ``lost_<m>x:<label>`` (mean
  points lost at m x), ``acc:<label>`` (at 1x), ``failed_<m>x:<label>``,
  ``holds_up`` (the configurations that hold up as AdamW does)."""
  out = {}
  for label, c in data["configs"].items():
    acc = statistics.mean(r["metric"] for r in c["runs"]["1"])
    out[f"acc:{label}"] = f"{acc:.1f}"
    out[f"lr:{label}"] = f"{c['tuned_lr']:.3g}"
    for m in _others(data):
      change = statistics.mean(lost(data, label, m))
      out[f"lost_{m}x:{label}"] = f"{-change:.1f}"
      out[f"change_{m}x:{label}"] = f"{change:+.1f}"
      runs = c["runs"][m]
      out[f"failed_{m}x:{label}"] = (
          f"{sum(r['diverged'] for r in runs)}/{len(runs)}")
    for m, share in c.get("clip_share", {}).items():
      out[f"clipped_{m}x:{label}"] = f"{100 * share['run']:.0f}%"
      out[f"clipped_last_{m}x:{label}"] = f"{100 * share['last_epoch']:.0f}%"
  ref = data["configs"].get("AdamW")
  for label, c in data["configs"].items():
    if ref is None or label == "AdamW":
      continue
    for m in data["multipliers"]:
      a = [r["metric"] for r in c["runs"][m]]
      b = [r["metric"] for r in ref["runs"][m]]
      se = math.sqrt(statistics.variance(a) / len(a)
                     + statistics.variance(b) / len(b))
      out[f"vs_adamw_{m}x:{label}"] = (
          f"{statistics.mean(a) - statistics.mean(b):+.1f} ± {se:.1f}")
  held = [label for label in data["configs"]
          if label.startswith("AdaHessian") and holds_up(data, label)]
  out["holds_up"] = ", ".join(held) if held else "none"
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny tasks, 1x and 10x, two seeds (tests)")
  parser.add_argument("--out", default=os.path.join("results", "study",
                                                    "robustness"),
                      help="the run cache (default results/study/robustness)")
  parser.add_argument("--results", default=None,
                      help="where the results files go (default docs/results"
                           "; with --quick, --out)")
  parser.add_argument("--tasks", nargs="*", default=None,
                      help="only tasks whose name contains one of these")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  results = args.results or (args.out if args.quick else RESULTS)
  print(timing.header(), flush=True)
  for task in tasks(args.quick):
    if args.tasks and not any(t in task.name for t in args.tasks):
      continue
    start = time.perf_counter()
    data = run_task(task, args.out, args.quick, not args.no_progress)
    path = os.path.join(results, f"robustness_{slug(task.name)}.json")
    report.save_json(path, data)
    print(f"\n{task.name} ({time.perf_counter() - start:.0f} s)")
    print(lost_table(data))
    print()
    print(vs_adamw_table(data))


if __name__ == "__main__":
  main()
