"""Sharpness during training: Adam and AdaHessian against their stability thresholds.

The network, data and training step are those of ``examples/digits.py``
(imported from there). Each optimizer trains the CNN at its tuned learning
rate and at a larger one where training degrades, and every few steps the
script measures, on a fixed batch of training images,

* the sharpness :math:`\\lambda_{\\max}(H)`, to compare with :math:`2/\\eta`
  (gradient descent's threshold), and
* the preconditioned sharpness :math:`\\lambda_{\\max}(P^{-1/2} H P^{-1/2})`,
  with :math:`P` read from the optimizer's state, to compare with
  :math:`(2 + 2\\beta_1)/((1 - \\beta_1)\\eta) = 38/\\eta` (Adam-type methods),

each Lanczos run warm-started from the previous measurement's eigenvector.
The Hessian is that of the training loss without dropout's noise: BatchNorm
normalises with the batch's own statistics, as in a training step.

It then times what tracking costs: the same training run with and without
a measurement every 100 steps, in one process, and the products each
measurement takes warm-started and from a random start.

    python examples/sharpness.py            # about 6 minutes on 2 cores
    python examples/sharpness.py --smoke    # seconds, for tests
    python examples/sharpness.py --jit      # each measurement inside one
                                            # jitted function of the state

Without ``--jit`` each measurement calls the analysis on concrete arrays
(the preconditioner read in Python), which runs each Lanczos run as its own
compiled program; with it, one jitted function reads the preconditioner
from the training state and runs both Lanczos runs.

It prints two tables, writes ``sharpness.json`` and ``sharpness.png`` to
``--out`` (default ``results/``); a full run also copies the plot to
``docs/images/``.
"""

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402  pylint: disable=wrong-import-position

import adahessian_optax as aho  # noqa: E402  pylint: disable=wrong-import-position

DOCS_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                           "docs", "images")
SPECS = {spec.name: spec for spec in digits.SPECS}
OPTIMIZERS = ("Adam", "AdaHessian")
# Both optimizers' b1 (the defaults digits.py uses).
B1 = 0.9
# The larger rate, a multiple of the tuned one: on the grid 3, 5, 7, 10, 30,
# the largest at which the run still trains (final training loss about 0.3,
# against 0.002 at the tuned rate); at the next one it ends at chance.
LARGER = {"Adam": 10.0, "AdaHessian": 7.0}
# (examples in the Hessian's batch, Lanczos tol, most Lanczos steps (None:
# the library's default, 100), what is measured) for the cost measurement:
# the plot's setting, then cheaper ones.
BOTH = ("sharpness", "preconditioned")
COST_SETTINGS = ((512, 1e-3, 20, BOTH), (128, 1e-2, 20, BOTH),
                 (64, 1e-2, None, BOTH), (64, 1e-2, 20, BOTH),
                 (32, 1e-2, 20, BOTH), (64, 1e-2, 20, ("preconditioned",)))
# The optimizers' eps: P = eps where their second moment is still zero.
EPS = {"Adam": 1e-8, "AdaHessian": 1e-4}


@functools.lru_cache(maxsize=None)
def _params_loss(graphdef):
  """The training loss of `(params, (rest, x, y))` without dropout.

  BatchNorm normalises with the batch's statistics (its running averages,
  in `rest`, are updated on a copy and dropped). One function per graph, so
  every measurement of a run reuses one compiled Hessian-vector product.
  """
  def loss(params, batch):
    rest, x, y = batch
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.set_attributes(deterministic=True, use_running_average=False,
                         raise_if_not_found=False)
    return digits.loss_fn(model, x, y)
  return loss


def preconditioner(name: str, optimizer, params):
  """The optimizer's diagonal preconditioner P, a pytree like `params`."""
  if name == "Adam":
    p = aho.adam_preconditioner(optimizer.opt_state)  # optax.adam's b2, eps
  else:
    p = aho.adahessian_preconditioner(optimizer.opt_state)
  # nnx.Optimizer keeps its state's arrays in OptVariable boxes and the
  # params in Param boxes: the operator matches them by position.
  del params
  return p


@functools.partial(jax.jit, static_argnames=("graphdef", "name", "kinds",
                                             "tol", "n_steps"))
def _measure_jitted(state, x, y, init, key, *, graphdef, name, kinds, tol,
                    n_steps):
  """`measure` of a training state as one program, the preconditioner read
  inside it: the Lanczos runs become `lax` loops (on XLA:CPU the library
  writes their convolutions in the layout that runs fast inside loops)."""
  model, optimizer = nnx.merge(graphdef, state)
  model_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  p = preconditioner(name, optimizer, params)
  loss = _params_loss(model_graphdef)
  return _measure(loss, (rest, x, y), params, p, init, key, kinds, tol,
                  n_steps)


def _shift_free(params):
  """All parameters but the convolutions' biases (a `wrt=` mask).

  BatchNorm subtracts the batch mean right after each convolution, so the
  loss does not depend on the convolution's bias: its gradient is zero, so
  Adam's P there is eps = 1e-8 (AdaHessian's 1e-4), and its Hessian is
  zero up to rounding, which P^-1 would amplify 1e8-fold.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not (path[0].key.startswith("conv")
                           and path[1].key == "bias"), params)


def _measure(loss, batch, params, p, init, key, kinds, tol, n_steps) -> dict:
  """`{kind: Eigenpairs}`: λmax(H) ("sharpness") and λmax(P^-1/2 H P^-1/2)
  ("preconditioned"), each started from `init[kind]` if given.

  One operator (one primal pass) serves both; the loss is defined once and
  the data is its `batch`, so that every measurement of a run reuses the
  compiled programs.
  """
  hessian = aho.curvature_operator(loss, params, batch=batch, wrt=_shift_free)
  ops = {"sharpness": hessian, "preconditioned": hessian.precondition(p)}
  return {kind: aho.eigenpairs(
      ops[kind], key, tol=tol, n_steps=n_steps,
      init=None if init is None else init[kind]) for kind in kinds}


class Tracker:
  """Measures the sharpnesses `kinds` of a run's state on a fixed batch.

  Each Lanczos run starts from the previous call's eigenvector (a warm
  start); with `compare_cold` it is repeated from a random start, untimed
  (its seconds are added to `excluded`), to count the products a warm
  start saves. With `jit` each measurement is one compiled program.
  """

  def __init__(self, name: str, x, y, tol: float, n_steps: int,
               kinds: tuple = BOTH, compare_cold: bool = False,
               jit: bool = False):
    self.name, self.x, self.y = name, x, y
    self.tol, self.n_steps, self.kinds = tol, n_steps, kinds
    self.compare_cold, self.jit = compare_cold, jit
    self.vectors = None
    self.excluded = 0.0

  def _pairs(self, model_graphdef, params, rest, p, init, step: int,
             tol=None) -> dict:
    tol = tol or self.tol
    loss = _params_loss(model_graphdef)
    return _measure(loss, (rest, self.x, self.y), params, p, init, step,
                    self.kinds, tol, self.n_steps if tol == self.tol else None)

  def _checked(self, pairs: dict, point: dict, suffix: str, *args) -> dict:
    """`pairs`, each one redone from a random start with tol 1e-4 where its
    residual is not small next to the eigenvalue itself; records values
    and products (both runs') in `point`.

    Lanczos stops when the residual is at most `tol` times the largest
    |Ritz value|. When the spectrum's negative end is the larger (as
    P^-1/2 H P^-1/2 can be early in training), that is a loose test for
    the top eigenvalue: a run can stop after 2 products at a value near 0.
    """
    for kind in list(pairs):
      products = int(pairs[kind].info.n_steps)
      value, residual = (float(pairs[kind].values[0]),
                         float(pairs[kind].info.residuals[0]))
      point[f"{kind}{suffix}_rechecked"] = residual > 10 * self.tol * abs(
          value)
      if point[f"{kind}{suffix}_rechecked"]:
        pairs[kind] = self._pairs(*args, tol=1e-4)[kind]
        products += int(pairs[kind].info.n_steps)
      point[f"{kind}{suffix}"] = float(pairs[kind].values[0])
      point[f"{kind}{suffix}_products"] = products
      point[f"{kind}{suffix}_converged"] = bool(pairs[kind].info.converged)
    return pairs

  def __call__(self, graphdef, state, step: int, learning_rate: float):
    if self.jit:
      return self._jitted(graphdef, state, step, learning_rate)
    model, optimizer = nnx.merge(graphdef, state)
    model_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p = preconditioner(self.name, optimizer, params)
    point = {"step": step, "learning_rate": learning_rate}
    args = (model_graphdef, params, rest, p, None, step)  # for a recheck
    warm = self._checked(
        self._pairs(model_graphdef, params, rest, p, self.vectors, step),
        point, "", *args)
    self.vectors = {kind: pairs.vectors for kind, pairs in warm.items()}
    if self.compare_cold:
      start = time.perf_counter()
      # Entries the optimizer has seen no gradient (or curvature) in yet.
      point["at_eps"] = int(sum(jax.device_get(
          [jnp.sum(x < 2 * EPS[self.name]) for x in jax.tree.leaves(p)])))
      self._checked(self._pairs(*args), point, "_cold", *args)
      self.excluded += time.perf_counter() - start
    return point

  def _jitted(self, graphdef, state, step: int, learning_rate: float):
    """One program per measurement; the random-start repeat (untimed)
    counts the products a warm start saves."""
    point = {"step": step, "learning_rate": learning_rate}
    measure = functools.partial(
        _measure_jitted, state, self.x, self.y, graphdef=graphdef,
        name=self.name, kinds=self.kinds, tol=self.tol, n_steps=self.n_steps)
    warm = measure(self.vectors, jax.random.key(step))
    self.vectors = {kind: pairs.vectors for kind, pairs in warm.items()}
    runs = {"": warm}
    if self.compare_cold:
      start = time.perf_counter()
      runs["_cold"] = measure(None, jax.random.key(step))
      model, optimizer = nnx.merge(graphdef, state)
      p = preconditioner(self.name, optimizer, nnx.state(model, nnx.Param))
      point["at_eps"] = int(sum(jax.device_get(
          [jnp.sum(x < 2 * EPS[self.name]) for x in jax.tree.leaves(p)])))
      jax.block_until_ready(runs["_cold"])
      self.excluded += time.perf_counter() - start
    for suffix, pairs in runs.items():
      for kind, pair in pairs.items():
        point[f"{kind}{suffix}"] = float(pair.values[0])
        point[f"{kind}{suffix}_products"] = int(pair.info.n_steps)
        point[f"{kind}{suffix}_converged"] = bool(pair.info.converged)
        point[f"{kind}{suffix}_rechecked"] = False
    return point


@functools.lru_cache(maxsize=None)
def _setup(name: str, learning_rate: float, total: int, warmup: int):
  """`(graphdef, train step, rate at each step, tx)` of one optimizer and
  rate: digits.py's warmup and cosine decay, peaking at `learning_rate`."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=warmup, decay_steps=total)
  tx = SPECS[name].make(schedule, 0)
  model = digits.CNN(nnx.Rngs(0))
  graphdef = nnx.graphdef((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  rates = np.asarray(jax.vmap(schedule)(jnp.arange(total))).tolist()
  return graphdef, digits.make_train_step(SPECS[name], graphdef), rates, tx


def run(name: str, learning_rate: float, batches, args, *, tracker=None,
        at=frozenset(), progress: bool = False):
  """Trains once; measures with `tracker` before the steps in `at`."""
  total = len(batches)
  graphdef, train_step, rates, tx = _setup(
      name, learning_rate, total, min(args.steps_per_epoch, total // 4 + 1))
  model = digits.CNN(nnx.Rngs(args.seed))
  state = nnx.state((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  losses, points = [], []
  bar = tqdm(total=total, desc=f"{name:>10} lr={learning_rate:.3g}",
             disable=not progress, leave=False, dynamic_ncols=True)
  excluded = tracker.excluded if tracker else 0.0
  tracking = 0.0  # in the measurements, the steps before them done
  start = time.perf_counter()
  for step, (x, y) in enumerate(batches):
    if tracker is not None and step in at:
      jax.block_until_ready(state)
      tracking -= time.perf_counter() - tracker.excluded
      points.append(tracker(graphdef, state, step, rates[step]))
      tracking += time.perf_counter() - tracker.excluded
    state, loss = train_step(state, x, y)
    losses.append(loss)
    bar.update(1)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  bar.close()
  if tracker is not None:
    seconds -= tracker.excluded - excluded
  return {"name": name, "learning_rate": learning_rate,
          "train_loss": np.asarray(jnp.stack(losses)).tolist(),
          "points": points, "seconds": seconds, "tracking_s": tracking}


def trajectories(batches, eval_batch, args):
  """Every optimizer at its tuned and larger rate, tracked every
  `args.every` steps and 4 times as often in the first epoch (the warmup),
  warm-started, each measurement repeated cold to compare."""
  early = max(1, args.every // 4)
  at = (set(range(args.every, len(batches), args.every))
        | set(range(early, args.steps_per_epoch, early)))
  rows = []
  for name in OPTIMIZERS:
    for multiple in (1.0, args.larger[name]):
      tracker = Tracker(name, *eval_batch, tol=args.tol,
                        n_steps=args.n_steps, compare_cold=True,
                        jit=args.jit)
      rows.append(run(name, SPECS[name].learning_rate * multiple, batches,
                      args, tracker=tracker, at=at,
                      progress=not args.no_progress))
  return rows


def _mean(values) -> float:
  return statistics.mean(values) if values else float("nan")


def cost(batches, data, args):
  """Seconds of a run with and without tracking every `args.cost_every`
  steps, in `args.repeats` pairs per setting (an untracked run, then a
  tracked one): the cost is the median over pairs of tracked ÷ untracked,
  so that a drift in the machine's speed cancels within each pair, and the
  time inside the measurements is the fastest pair's. The timed runs track
  warm-started only; one more, untimed, repeats each measurement from a
  random start to count the products that saves (a repeat inside a timed
  run would overlap the warm measurement, which runs asynchronously, and
  hide part of its time)."""
  rows = []
  for name in OPTIMIZERS:
    lr = SPECS[name].learning_rate
    run(name, lr, batches, args)  # compiles the step
    at = set(range(args.cost_every, len(batches), args.cost_every))
    for n, tol, n_steps, kinds in args.cost_settings:
      eval_batch = (jnp.asarray(data[0][:n]), jnp.asarray(data[1][:n]))
      tracker = functools.partial(Tracker, name, *eval_batch, tol=tol,
                                  n_steps=n_steps, kinds=kinds, jit=args.jit)
      # Untimed: compiles the measurement; counts warm and cold products.
      counted = run(name, lr, batches, args,
                    tracker=tracker(compare_cold=True), at=at)
      pairs = []
      for _ in range(args.repeats):
        plain = run(name, lr, batches, args)["seconds"]
        record = run(name, lr, batches, args, tracker=tracker(), at=at)
        pairs.append((plain, record["seconds"], record["tracking_s"]))
      warm = counted["points"][1:]  # the first call has no earlier vector
      products = lambda key, pts: _mean(
          [sum(p[f"{kind}{key}"] for kind in kinds) for p in pts])
      calls = len(record["points"])
      rows.append({
          "name": name, "learning_rate": lr, "eval_size": n, "tol": tol,
          "n_steps": n_steps, "kinds": list(kinds), "calls": calls,
          "plain_s": statistics.median(p for p, _, _ in pairs),
          "tracked_s": statistics.median(t for _, t, _ in pairs),
          "overhead": statistics.median(t / p - 1 for p, t, _ in pairs),
          "ms_per_call": 1e3 * min(c for _, _, c in pairs) / calls,
          "measuring": min(c / p for p, _, c in pairs),
          "warm_products": products("_products", warm),
          "cold_products": products("_cold_products", warm),
          "points": counted["points"]})
  return rows


def cost_table(rows) -> str:
  lines = ["| optimizer | tracked | Hessian batch | tol | n_steps | calls "
           "| run s | tracked run s | cost | ms per call "
           "| measuring ÷ run | products per call: warm | cold |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    what = ("both" if len(r["kinds"]) == 2
            else "λmax(P⁻¹H) only")
    lines.append(
        f"| {r['name']} | {what} | {r['eval_size']} | {r['tol']:g} "
        f"| {r['n_steps'] or 'default (100)'} | {r['calls']} "
        f"| {r['plain_s']:.2f} | {r['tracked_s']:.2f} "
        f"| {100 * r['overhead']:+.0f}% | {r['ms_per_call']:.0f} "
        f"| {100 * r['measuring']:.0f}% | {r['warm_products']:.1f} "
        f"| {r['cold_products']:.1f} |")
  return "\n".join(lines)


def _ratios(points):
  """Each point's sharpness over 2/lr and preconditioned one over 38/lr."""
  return ([p["sharpness"] / aho.stability_threshold(p["learning_rate"])
           for p in points],
          [p["preconditioned"]
           / aho.stability_threshold(p["learning_rate"], B1)
           for p in points])


def trajectory_table(rows, steps_per_epoch: int) -> str:
  """Final values, and the largest ratios to the thresholds during the
  warmup (the first epoch) and after it."""
  lines = ["| optimizer | peak lr | final train loss | last λmax(H) "
           "| max λmax(H)/(2/η) after warmup | last λmax(P⁻¹H) "
           "| max λmax(P⁻¹H)/(38/η): warmup (step; entries at ε) "
           "| after warmup (step) | products per call: warm, cold |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    pts = r["points"]
    sharp, pre = _ratios(pts)
    early = [i for i, p in enumerate(pts) if p["step"] < steps_per_epoch]
    late = [i for i, p in enumerate(pts) if p["step"] >= steps_per_epoch]
    i = max(early, key=lambda j: pre[j])
    j = max(late, key=lambda j: pre[j])
    final = np.mean(r["train_loss"][-steps_per_epoch:])
    warm = _mean([p["sharpness_products"] + p["preconditioned_products"]
                  for p in pts[1:]])
    cold = _mean([p["sharpness_cold_products"]
                  + p["preconditioned_cold_products"] for p in pts[1:]])
    lines.append(
        f"| {r['name']} | {r['learning_rate']:.3g} | {final:.3g} "
        f"| {pts[-1]['sharpness']:.3g} | {max(sharp[k] for k in late):.2f} "
        f"| {pts[-1]['preconditioned']:.3g} "
        f"| {pre[i]:.3g} ({pts[i]['step']}; {pts[i]['at_eps']}) "
        f"| {pre[j]:.2f} ({pts[j]['step']}) | {warm:.1f}, {cold:.1f} |")
  return "\n".join(lines)


# The docs' tables and quoted values, each a function of a results file
# (``--json``): docs/results/sharpness_trajectories.json (``python
# examples/sharpness.py --skip-cost --json ...``), sharpness_cost_jit.json
# and sharpness_cost.json (``--skip-trajectories --cost-sizes 64 32``, with
# and without ``--jit``) and sharpness_cost_512_jit.json (``--cost-sizes
# 512 --jit``).


def trajectory_results(data) -> str:
  """docs/sharpness.md's table of the trajectories."""
  return trajectory_table(data["trajectories"],
                          data["settings"]["steps_per_epoch"])


def cost_results(data) -> str:
  """docs/sharpness.md's tables of what tracking costs."""
  return cost_table(data["cost"])


def _label(r, tuned: dict) -> str:
  return f"{r['name']} {'tuned' if r['learning_rate'] == tuned[r['name']] else 'larger'}"


def _round(x: float, digits: int = 2) -> str:
  """`x` to `digits` significant digits, thousands separated; as
  ``m × 10ⁿ`` from a million."""
  if abs(x) >= 1e6:
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    sup = str(int(exponent)).translate(str.maketrans("-0123456789",
                                                     "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"{mantissa} × 10{sup}"
  if x == 0:
    return "0"
  rounded = round(x, digits - 1 - int(np.floor(np.log10(abs(x)))))
  return f"{rounded:,.{max(0, digits - 1 - int(np.floor(np.log10(abs(x)))))}f}"


def trajectory_values(data) -> dict:
  """The numbers docs/sharpness.md's prose quotes from the trajectories,
  per run (``Adam tuned``, ``Adam larger``, ``AdaHessian tuned``,
  ``AdaHessian larger``)."""
  rows = data["trajectories"]
  warmup = data["settings"]["steps_per_epoch"]
  tuned = {}
  for r in rows:
    tuned.setdefault(r["name"], r["learning_rate"])
  out = {"warmup steps": str(warmup), "steps": str(len(rows[0]["train_loss"])),
         "eval size": str(data["settings"]["eval_size"]),
         "minutes": f"{data['seconds'] / 60:.0f}"}
  warm, cold, saved, falls, tuned_late = [], [], [], [], []
  for r in rows:
    label, pts = _label(r, tuned), r["points"]
    sharp, pre = _ratios(pts)
    late = [i for i, p in enumerate(pts) if p["step"] >= warmup]
    early = [i for i, p in enumerate(pts) if p["step"] < warmup]
    i = max(early, key=lambda k: pre[k])
    out[f"{label} pre warmup max"] = f"{pre[i]:.3g}"
    out[f"{label} pre warmup max step"] = str(pts[i]["step"])
    for p, ratio in zip(pts, pre):
      step = p["step"]
      out[f"{label} pre at {step}"] = _round(p["preconditioned"])
      out[f"{label} pre ratio at {step}"] = f"{ratio:.2g}"
      out[f"{label} threshold at {step}"] = (
          f"{aho.stability_threshold(p['learning_rate'], B1):,.0f}")
      out[f"{label} at eps at {step}"] = f"{p['at_eps']:,}"
    above = [pts[k]["step"] for k in late if pre[k] >= 1]
    below_from = next((pts[k]["step"] for k in late
                       if all(pre[j] < 1 for j in late if j >= k)), None)
    out[f"{label} pre below from"] = str(below_from)
    out[f"{label} pre above after warmup"] = str(len(above))
    out[f"{label} pre max after warmup"] = f"{max(pre[k] for k in late):.2g}"
    if r["learning_rate"] == tuned[r["name"]]:
      tuned_late.append(max(pre[k] for k in late))
    h_above = [pts[k]["step"] for k in late if sharp[k] >= 1]
    out[f"{label} sharp last step above"] = (
        str(max(h_above)) if h_above else "none")
    out[f"{label} sharp min ratio until then"] = (
        f"{min(sharp[k] for k in late if pts[k]['step'] <= max(h_above)):.2g}"
        if h_above else "none")
    until = [k for k in late if h_above and pts[k]["step"] <= max(h_above)]
    out[f"{label} sharp above until then"] = (
        f"{len(h_above)} of {len(until)}" if h_above else "none")
    out[f"{label} sharp max after warmup"] = (
        f"{max(sharp[k] for k in late):.2g}")
    out[f"{label} final loss"] = f"{np.mean(r['train_loss'][-warmup:]):.3g}"
    if r["learning_rate"] == tuned[r["name"]]:
      for kind, ks in (("sharpness", range(len(pts))), ("preconditioned",
                                                        late)):
        values_ = [pts[k][kind] for k in ks]
        falls.append(max(values_) / values_[-1])
    w = _mean([p["sharpness_products"] + p["preconditioned_products"]
               for p in pts[1:]])
    c = _mean([p["sharpness_cold_products"]
               + p["preconditioned_cold_products"] for p in pts[1:]])
    warm.append(w)
    cold.append(c)
    saved.append(c - w)
  out["tuned fall"] = f"{_round(min(falls))} to {_round(max(falls))}"
  out["tuned pre max after warmup"] = f"{max(tuned_late):.2g}"
  out["warm products"] = f"{min(warm):.1f} to {max(warm):.1f}"
  out["cold products"] = f"{min(cold):.1f} to {max(cold):.1f}"
  out["saved products"] = f"{min(saved):.1f} to {max(saved):.1f}"
  out["saved %"] = f"{100 * _mean(saved) / _mean(cold):.0f}"
  points = [p for r in rows for p in r["points"]]
  out["most products"] = str(max(
      max(p[f"{kind}{suffix}_products"] for kind in BOTH)
      for p in points for suffix in ("", "_cold")))
  out["all converged"] = ("Every" if all(
      p[f"{kind}{suffix}_converged"] for p in points for kind in BOTH
      for suffix in ("", "_cold")) else "Not every")
  out["rechecked"] = str(sum(
      p[f"{kind}{suffix}_rechecked"] for p in points for kind in BOTH
      for suffix in ("", "_cold")))
  out["measurements"] = str(2 * len(points))
  return out


def cost_values(data) -> dict:
  """The numbers docs/sharpness.md's prose quotes from a cost file: per
  setting (``Adam both 64 20 cost``: optimizer, ``both`` or ``pre``,
  Hessian batch, n_steps or ``default``; then ``cost``, ``ms``,
  ``measuring``, ``saved``), and ranges over the settings."""
  rows = data["cost"]
  out = {"repeats": str(data["settings"]["repeats"]),
         "every": str(data["settings"]["cost_every"]),
         "minutes": f"{data['seconds'] / 60:.0f}"}
  pct = lambda x: f"{100 * x:+.0f}%"

  def span(xs, fmt):
    lo, hi = fmt(min(xs)), fmt(max(xs))
    return lo if lo == hi else f"{lo} to {hi}"

  for r in rows:
    key = " ".join([r["name"], "both" if len(r["kinds"]) == 2 else "pre",
                    str(r["eval_size"]), str(r["n_steps"] or "default")])
    out[f"{key} cost"] = pct(r["overhead"])
    out[f"{key} ms"] = f"{r['ms_per_call']:.0f}"
    out[f"{key} measuring"] = f"{100 * r['measuring']:.0f}%"
    out[f"{key} saved"] = f"{r['cold_products'] - r['warm_products']:.1f}"
    out[f"{key} measuring ÷ run"] = f"{r['measuring']:.2f}"
    # A product's time over a training step's.
    steps = data["settings"]["epochs"] * data["settings"]["steps_per_epoch"]
    out[f"{key} product in steps"] = (
        f"{r['ms_per_call'] / r['warm_products'] / (1e3 * r['plain_s'] / steps):.0f}")
  for name in OPTIMIZERS:
    mine = [r for r in rows if r["name"] == name]
    if not mine:
      continue
    cheap = [r for r in mine if r["n_steps"]]
    out[f"{name} cost"] = span([r["overhead"] for r in cheap], pct)
    out[f"{name} run s"] = span([r["plain_s"] for r in mine],
                                lambda x: f"{x:.1f}")
    out[f"{name} measuring"] = span([r["measuring"] for r in cheap],
                                    lambda x: f"{100 * x:.0f}%")
  cheap = [r for r in rows if r["n_steps"]]
  if cheap:
    out["max cost"] = pct(max(r["overhead"] for r in cheap))
    out["measuring"] = span([r["measuring"] for r in cheap],
                            lambda x: f"{100 * x:.0f}%")
  out["saved"] = span([r["cold_products"] - r["warm_products"] for r in rows],
                      lambda x: f"{x:.1f}")
  out["saved mean"] = f"{_mean([r['cold_products'] - r['warm_products'] for r in rows]):.1f}"
  return out


def plot(rows, path: str, steps_per_epoch: int, eval_size: int) -> None:
  """Per optimizer: the two sharpnesses with their thresholds, and the
  training loss."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(len(OPTIMIZERS), 3, figsize=(12, 3.3 * len(
      OPTIMIZERS)), squeeze=False)
  for ax_row, name in zip(axes, OPTIMIZERS):
    ax_h, ax_p, ax_loss = ax_row
    for color, r in zip(("C0", "C3"), [r for r in rows if r["name"] == name]):
      pts = r["points"]
      steps = [p["step"] for p in pts]
      lrs = [p["learning_rate"] for p in pts]
      label = f"lr {r['learning_rate']:.3g}"
      ax_h.plot(steps, [p["sharpness"] for p in pts], color=color,
                label=label)
      ax_h.plot(steps, [aho.stability_threshold(lr) for lr in lrs], "--",
                color=color, alpha=0.7, label="2/η")
      ax_p.plot(steps, [p["preconditioned"] for p in pts], color=color,
                label=label)
      ax_p.plot(steps, [aho.stability_threshold(lr, B1) for lr in lrs], "--",
                color=color, alpha=0.7, label="38/η")
      loss = np.asarray(r["train_loss"])
      n = len(loss) // steps_per_epoch * steps_per_epoch
      per_epoch = loss[:n].reshape(-1, steps_per_epoch).mean(1)
      ax_loss.plot(steps_per_epoch * np.arange(1, len(per_epoch) + 1),
                   per_epoch, color=color, label=label)
    for ax in ax_row:
      ax.axvspan(0, steps_per_epoch, color="0.92", zorder=0)
    ax_h.set(title=f"{name}: " + r"$\lambda_{\max}(H)$", yscale="log",
             xlabel="step")
    ax_p.set(title=f"{name}: " + r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$",
             yscale="log",
             xlabel="step")
    ax_loss.set(title=f"{name}: training loss (epoch mean)", yscale="log",
                xlabel="step")
    for ax in ax_row:
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle("Digits CNN: sharpness (solid) against stability thresholds "
               f"(dashed) on {eval_size} training images; grey: the warmup "
               "epoch")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _settings(args) -> dict:
  """The run's settings, as the results file records them."""
  keys = ("epochs", "batch_size", "seed", "eval_size", "tol", "n_steps",
          "every", "cost_every", "repeats", "jit", "steps_per_epoch", "smoke")
  return {**{k: getattr(args, k) for k in keys},
          "larger": dict(args.larger),
          "cost_settings": [[n, tol, n_steps, list(kinds)] for
                            n, tol, n_steps, kinds in args.cost_settings]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--epochs", type=int, default=None,
                      help=f"default {digits.EPOCHS} (2 with --smoke)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval-size", type=int, default=None,
                      help="training images in the Hessian's batch (default "
                           "512; 32 with --smoke)")
  parser.add_argument("--tol", type=float, default=None,
                      help="Lanczos tolerance of the plotted runs (default "
                           "1e-3; 1e-2 with --smoke)")
  parser.add_argument("--n-steps", type=int, default=20,
                      help="most Lanczos steps per measurement (default 20: "
                           "the library's 100 makes every step slower)")
  parser.add_argument("--every", type=int, default=None,
                      help="steps between the plotted measurements "
                           "(default 20; 3 with --smoke)")
  parser.add_argument("--cost-every", type=int, default=None,
                      help="steps between the timed measurements (default "
                           "100; 3 with --smoke)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed pairs of runs per setting, their median "
                           "kept (default 3; 1 with --smoke)")
  parser.add_argument("--jit", action="store_true",
                      help="each measurement as one jitted function of the "
                           "training state (the preconditioner read inside)")
  parser.add_argument("--cost-sizes", type=int, nargs="+", default=None,
                      help="only the cost settings of these Hessian batch "
                           "sizes")
  parser.add_argument("--skip-trajectories", action="store_true")
  parser.add_argument("--skip-cost", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny run for tests; does not touch docs/")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--json", default=None,
                      help="also write the results here, with the settings, "
                           "for the docs' tables (docs/sharpness.md reads "
                           "docs/results/sharpness_*.json)")
  args = parser.parse_args(argv)
  smoke = args.smoke
  if args.epochs is None:
    args.epochs = 2 if smoke else digits.EPOCHS
  if args.eval_size is None:
    args.eval_size = 32 if smoke else 512
  if args.every is None:
    args.every = 3 if smoke else 20
  if args.cost_every is None:
    args.cost_every = 3 if smoke else 100
  if args.tol is None:
    args.tol = 1e-2 if smoke else 1e-3
  if args.repeats is None:
    args.repeats = 1 if smoke else 3
  if smoke:
    args.batch_size = min(args.batch_size, 32)
  args.cost_settings = ((32, 1e-2, 20, BOTH),) if smoke else COST_SETTINGS
  if args.cost_sizes:
    args.cost_settings = [c for c in args.cost_settings
                          if c[0] in args.cost_sizes]
  args.larger = LARGER

  start = time.perf_counter()
  data = digits.load_data(args.seed, smoke, validation=False)
  x_train, y_train = data[0], data[1]
  args.steps_per_epoch = len(x_train) // args.batch_size
  order_rng = np.random.default_rng(args.seed)  # the same batches for all
  batches = []
  for _ in range(args.epochs):
    order = order_rng.permutation(len(x_train))
    for idx in np.split(order[:args.steps_per_epoch * args.batch_size],
                        args.steps_per_epoch):
      batches.append((jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])))
  eval_batch = (jnp.asarray(x_train[:args.eval_size]),
                jnp.asarray(y_train[:args.eval_size]))

  rows = [] if args.skip_trajectories else trajectories(batches, eval_batch,
                                                        args)
  costs = [] if args.skip_cost else cost(batches, data, args)

  device = jax.devices()[0]
  print(f"\nDigits CNN, {args.epochs} epochs of batch {args.batch_size} "
        f"({len(batches)} steps), {device.platform.upper()} "
        f"({os.cpu_count()} cores){', measurements jitted' * args.jit}")
  parts = []
  if rows:
    parts += [f"Sharpness on {args.eval_size} training images every "
              f"{args.every} steps (tol {args.tol:g}, n_steps "
              f"{args.n_steps}); thresholds 2/η and 38/η at each step's "
              "rate η:", trajectory_table(rows, args.steps_per_epoch)]
  if costs:
    parts += [f"Cost of tracking every {args.cost_every} steps (medians "
              f"of {args.repeats} pairs of runs):", cost_table(costs)]
  report = "\n\n".join(parts)
  print("\n" + report)

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sharpness.md"), "w") as f:
    f.write(report + "\n")
  with open(os.path.join(args.out, "sharpness.json"), "w") as f:
    json.dump({"trajectories": rows, "cost": costs}, f)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"script": "python examples/sharpness.py "
                           + " ".join(sys.argv[1:] if argv is None else argv),
                 "settings": _settings(args), "jax": jax.__version__,
                 "adahessian_optax": aho.__version__,
                 "platform": device.platform, "cpus": os.cpu_count(),
                 "seconds": time.perf_counter() - start,
                 "trajectories": rows, "cost": costs}, f)
      f.write("\n")
    print(f"wrote {args.json}")
  if rows:
    png = os.path.join(args.out, "sharpness.png")
    plot(rows, png, args.steps_per_epoch, args.eval_size)
    if not smoke and not args.jit:
      shutil.copy(png, DOCS_IMAGES)
  print(f"wrote {args.out}/sharpness.* ({time.perf_counter() - start:.0f} s "
        "in all)")


if __name__ == "__main__":
  main()
