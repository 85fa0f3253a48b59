r"""Why AdaHessian breaks at large learning rates: measurements along its runs.

The study (``docs/study.md``) found AdaHessian not robust to the learning
rate: from 3x to 10x its tuned rate it diverges where Adam holds. This
module trains AdaHessian and Adam at 1x, 3x, 5x and 10x their tuned peak rates
on the study's functional tasks (the axis-aligned quadratic, the MLP, the
char LM; same schedule, batches, loss closure and update rule as
``tasks.run_functional``, one jitted step at a time) and, every few steps,
measures after the update ``t``:

* the preconditioned sharpness :math:`\lambda_P = \lambda_{\max}(P^{-1/2} H
  P^{-1/2})` of the step's batch at the new params, with :math:`P` the
  denominator read from the optimizer state (warm-started Lanczos), against
  the edge of stability :math:`38/\eta_t` (:func:`aho.stability_threshold`
  with :math:`\beta_1 = 0.9`), :math:`\eta_t` the rate of the next update,
  and where its top eigenvector sits (the leaf holding most of it, its
  largest squared entry and the denominator there);
* the denominator :math:`d = \sqrt{\hat\nu} + \epsilon` (Adam's
  :math:`\sqrt{\hat v} + \epsilon`) over the coordinates that ever had a
  gradient (min, 0.1% and 1% quantiles, median, the fraction below
  :math:`10\epsilon`; the others, zero pixels and unseen characters, sit at
  :math:`\epsilon` and take no gradient step);
* the step just taken :math:`s = \eta\,|u|` (max, 99.9% quantile, the largest
  per-leaf RMS), and where the largest steps sit: the median :math:`d` of the
  0.1% largest steps against the median :math:`d` overall, and how many of
  them have :math:`d < 10\epsilon`.

When the training loss first exceeds 10x its first value (or stops being
finite), the run is replayed from its last measurement with measurements at
nearly every step up to that point, so the sharpness just before the blow-up
is seen. A non-finite loss ends the run (it has diverged).

Each run is cached as JSON under ``--out`` (named by task, optimizer,
multiplier and seed), so a rerun resumes. From the repository root::

    python -m benchmarks.study.failure            # about 3 minutes, 2 cores
    python -m benchmarks.study.failure --quick --out /tmp/f   # seconds

The digits CNN is left out (``examples/sharpness.py`` tracks its sharpness
at the tuned rates): it was left out while XLA:CPU ran convolutions inside
``lax`` loops slowly, which 0.5.0 fixed, and has not been added since.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_optax as aho
from benchmarks.common import report
from benchmarks.study import optimizers as so
from benchmarks.study import tasks as st

ADAM = so.Opt("Adam", "adam", (-8, -2))
OPTS = (so.ADAHESSIAN, ADAM)
# The tuned peak rates of docs/study.md (the study's rounded grid points).
TUNED = {"quadratic, axis-aligned": {"AdaHessian": 3.162, "Adam": 0.1},
         "MLP": {"AdaHessian": 0.1, "Adam": 0.01},
         "char LM": {"AdaHessian": 0.3162, "Adam": 0.01}}
MULTIPLIERS = (1, 3, 5, 10)
SEEDS = (0, 1)
B1, B2 = 0.9, 0.999  # both optimizers'
EPS = {"adahessian": 1e-4, "adam": 1e-8}
BLOW_UP = 10.0  # a loss above this times the first is a blow-up
TOP = 1e-3  # the largest steps: this fraction of the coordinates


@dataclasses.dataclass(frozen=True)
class Settings:
  """How much to run and measure.

  Attributes:
    quick: the study's quick tasks, one seed, 1x and 10x.
    measurements: about this many regular measurements per run.
    lanczos_steps: the most Lanczos steps (products) per measurement.
    tol: Lanczos's relative residual tolerance.
  """

  quick: bool = False
  measurements: int = 20
  lanczos_steps: int = 20
  tol: float = 1e-2

  @property
  def seeds(self) -> tuple:
    return SEEDS[:1] if self.quick else SEEDS

  @property
  def multipliers(self) -> tuple:
    return (1, 10) if self.quick else MULTIPLIERS


# The quick run's: Lanczos to convergence on the small quadratic (its tests
# compare with exact eigenvalues), at most 50 products on the others.
QUICK = Settings(quick=True, lanczos_steps=50, tol=1e-5)


def functional_tasks(quick: bool) -> list:
  return [st.Quadratic("quadratic, axis-aligned", False, quick),
          st.DigitsMLP(quick), st.CharLM(quick)]


def preconditioner(opt: so.Opt, opt_state) -> Any:
  """The denominator P of the optimizer's step, a pytree like the params."""
  if opt.family == "adahessian":
    return aho.adahessian_preconditioner(opt_state, b2=B2,
                                         eps=EPS["adahessian"])
  return aho.adam_preconditioner(opt_state, b2=B2, eps=EPS["adam"])


def schedule(steps: int, opt: so.Opt) -> optax.Schedule:
  """The study's warmup-cosine schedule to 1 (the peak rate multiplies)."""
  return st._unit_schedule(steps, opt)  # pylint: disable=protected-access


def _flat(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def first_moment(opt_state) -> Any:
  """The gradient's EMA `mu` of the one AdaHessian or Adam state."""
  kinds = (aho.ScaleByAdaHessianState, optax.ScaleByAdamState)
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(x, kinds)]
  assert len(found) == 1, found
  return found[0].mu


def masked_quantiles(x: jax.Array, mask: jax.Array, qs) -> jax.Array:
  """`numpy.quantile(x[mask], qs)` (linear interpolation) under jit."""
  n = jnp.sum(mask)
  ordered = jnp.sort(jnp.where(mask, x, jnp.inf))
  pos = jnp.asarray(qs, jnp.float32) * (n - 1).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n - 1)
  return ordered[lo] + (pos - lo.astype(jnp.float32)) * (ordered[hi]
                                                        - ordered[lo])


def step_stats(d: jax.Array, s: jax.Array, active: jax.Array,
               eps: float) -> dict:
  """Statistics of the flat denominators `d` and steps `s` (same order).

  The denominator's are over the `active` coordinates (a gradient ever
  nonzero): the others (pixels that are zero in every image, characters
  never seen) have d = eps and take no gradient step. Fractions are left
  as counts (`fractions` divides them on the host, exactly).
  """
  q_d = masked_quantiles(d, active, [1e-3, 1e-2, 0.5])
  small = d < 10 * eps
  _, top = jax.lax.top_k(s, max(1, math.ceil(TOP * s.size)))
  return {"n": d.size, "n_top": top.size, "n_inactive": jnp.sum(~active),
          "n_small": jnp.sum(active & small),
          "n_top_small": jnp.sum(small[top]), "d_min_all": jnp.min(d),
          "d_min": jnp.min(jnp.where(active, d, jnp.inf)), "d_q001": q_d[0],
          "d_q01": q_d[1], "d_median": q_d[2],
          "s_max": jnp.max(s), "s_q999": jnp.quantile(s, 1 - TOP),
          "d_at_s_max": d[top[0]], "d_median_top": jnp.median(d[top])}


def fractions(stats: dict) -> dict:
  """`step_stats`'s counts as fractions: of all coordinates (inactive), of
  the active ones (d < 10 eps), of the largest steps (d < 10 eps there)."""
  active = stats["n"] - stats["n_inactive"]
  return dict(stats, inactive=stats["n_inactive"] / stats["n"],
              d_small=stats["n_small"] / max(active, 1),
              top_small=stats["n_top_small"] / stats["n_top"])


def eigvec_stats(vectors, d: jax.Array) -> dict:
  """Where the top eigenvector of P^-1/2 H P^-1/2 sits: its mass per leaf,
  its largest squared entry, and the denominator there."""
  v2 = [jnp.sum(v.astype(jnp.float32) ** 2, axis=0)
        for v in jax.tree.leaves(vectors)]
  flat = jnp.concatenate([jnp.ravel(x) for x in v2])
  return {"leaf_mass": jnp.stack([jnp.sum(x) for x in v2]),
          "v_peak": jnp.max(flat), "d_at_v_peak": d[jnp.argmax(flat)]}


@functools.lru_cache(maxsize=None)
def step_program(task, opt: so.Opt, steps: int):
  """`(params, state, batch, lr) -> (params, state, loss, updates)`: one
  step of `run_functional`'s scan, jitted, also returning the updates.

  Traced with the seed-0 optimizer, as ``tasks.run_functional``: the seed
  lives in the state.
  """
  tx = opt.make(task, schedule(steps, opt), 0)

  @jax.jit
  def step(params, state, batch, lr):
    batch = batch if len(batch) > 1 else batch[0]
    value_fn = opt.value_fn(task, batch)
    loss, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    params = optax.apply_updates(params, optax.tree.scale(lr, updates))
    return params, state, loss, updates

  return step


@functools.lru_cache(maxsize=None)
def measure_program(task, opt: so.Opt, settings: Settings):
  """`(params, state, updates, batch, lr, init, key) -> (stats, vectors)`:
  λ_P of the batch's Hessian (Lanczos from `init`), the loss,
  `step_stats`, `eigvec_stats` and the per-leaf RMS step, jitted."""
  @jax.jit
  def measure(params, state, updates, batch, lr, init, key):
    batch = batch if len(batch) > 1 else batch[0]
    value_fn = lambda p: task.loss(p, batch)  # noqa: E731
    p = preconditioner(opt, state)
    dim = sum(x.size for x in jax.tree.leaves(params))
    pairs = aho.hessian_eigenvalues(
        value_fn, params, key, n_steps=min(settings.lanczos_steps, dim),
        tol=settings.tol, init=init, preconditioner=p)
    d = _flat(p)
    out = step_stats(d, lr * jnp.abs(_flat(updates)),
                     _flat(first_moment(state)) != 0, EPS[opt.family])
    out.update(eigvec_stats(pairs.vectors, d))
    rms = [lr * jnp.sqrt(jnp.mean(u ** 2)) for u in jax.tree.leaves(updates)]
    out.update(loss=value_fn(params), lam=pairs.values[0],
               lanczos_steps=pairs.info.n_steps,
               converged=pairs.info.converged, leaf_rms=jnp.stack(rms))
    return out, pairs.vectors

  return measure


def measure_steps(steps: int, warmup: int, every: int) -> set:
  """The first steps, the middle and end of warmup, then every `every`."""
  return ({t for t in (1, 2, 3, 5, 8, warmup // 2, warmup) if 1 <= t <= steps}
          | set(range(every, steps + 1, every)) | {steps})


def _blown(loss: float, first: float) -> bool:
  return not math.isfinite(loss) or loss > BLOW_UP * first


def _random_init(params, seed: int):
  """A random unit-ish start for the first Lanczos run (one compiled
  measurement: every call gets an `init`)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, (1,) + x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


class _Run:
  """One training run with measurements (see the module docstring)."""

  def __init__(self, task, opt: so.Opt, lr: float, seed: int,
               settings: Settings):
    self.task, self.opt, self.lr, self.seed = task, opt, lr, seed
    self.batches = task.batches(seed, "test")
    self.per_chunk = self.batches[0].shape[1]
    self.steps = self.batches[0].shape[0] * self.per_chunk
    self.schedule = schedule(self.steps, opt)
    self.warmup = next(t for t in range(1, self.steps + 1)
                       if self.schedule(t) >= 1 - 1e-6)  # the peak
    self.step = step_program(task, opt, self.steps)
    self.measure_fn = measure_program(task, opt, settings)
    self.settings = settings
    self.records, self.init = [], None

  def batch(self, t: int) -> tuple:
    """The batch of update `t` (1-based)."""
    i, j = divmod(t - 1, self.per_chunk)
    return tuple(b[i, j] for b in self.batches)

  def measure(self, t: int, params, state, updates, replay=False) -> None:
    """Measures after update `t`; η_t is the next update's rate."""
    if self.init is None:
      self.init = _random_init(params, self.seed)
    out, vectors = self.measure_fn(
        params, state, updates, self.batch(t), jnp.float32(self.lr),
        self.init, jnp.int32(1000 * self.seed + t))
    out = fractions({k: np.asarray(v).tolist()
                     for k, v in jax.device_get(out).items()})
    eta = self.lr * float(self.schedule(t))
    out.update(step=t, eta=eta, replay=replay,
               threshold=aho.stability_threshold(eta, B1) if eta > 0
               else math.inf,
               ratio=out["lam"] * eta / aho.stability_threshold(1.0, B1))
    self.records.append(out)
    # A warm start from a non-finite vector would stay non-finite.
    finite = all(bool(jnp.all(jnp.isfinite(v)))
                 for v in jax.tree.leaves(vectors))
    self.init = vectors if finite else None

  def replay(self, start: tuple, blown: int) -> None:
    """Reruns updates after `start` (t, params, state) up to `blown` with
    measurements at nearly every step."""
    t0, params, state = start
    if blown <= t0:
      return
    at = set(range(max(t0 + 1, blown - 4), blown + 1)) | {
        int(t) for t in np.linspace(t0 + 1, blown, 6)}
    lr = jnp.float32(self.lr)
    for t in range(t0 + 1, blown + 1):
      params, state, _, updates = self.step(params, state,
                                                 self.batch(t), lr)
      if t in at:
        self.measure(t, params, state, updates, replay=True)

  def train(self) -> dict:
    params = self.task.init(self.seed)
    state = self.opt.make(self.task, self.schedule, self.seed).init(params)
    every = max(1, self.steps // self.settings.measurements)
    at = measure_steps(self.steps, self.warmup, every)
    lr, losses, blown = jnp.float32(self.lr), [], None
    start = (0, params, state)  # the last measured point, for a replay
    for t in range(1, self.steps + 1):
      new = self.step(params, state, self.batch(t), lr)
      losses.append(float(new[2]))  # the loss after t - 1 updates
      if blown is None and _blown(losses[-1], losses[0]):
        blown = t - 1
        self.replay(start, blown)
      if not math.isfinite(losses[-1]):
        break
      params, state, _, updates = new
      if t in at:
        self.measure(t, params, state, updates)
        start = (t, params, state)
    self.records.sort(key=lambda r: (r["step"], r["replay"]))
    return self.result(params, losses, blown)

  def result(self, params, losses: list, blown: Optional[int]) -> dict:
    finished = len(losses) == self.steps and math.isfinite(losses[-1])
    final = (float(np.mean(losses[-self.per_chunk:])) if finished
             else math.nan)
    metric = self.task.evaluate(params, "test")[1] if finished else math.nan
    return {"task": self.task.name, "optimizer": self.opt.label,
            "lr": self.lr, "seed": self.seed, "steps": self.steps,
            "warmup": self.warmup, "eps": EPS[self.opt.family],
            "leaves": [jax.tree_util.keystr(k) for k, _ in
                       jax.tree_util.tree_flatten_with_path(params)[0]],
            "train_loss": losses, "final_train_loss": final,
            "diverged": st.diverged(losses, final), "blow_up": blown,
            "metric": metric, "measurements": self.records}


def run_one(task, opt: so.Opt, multiplier: float, seed: int,
            settings: Settings = Settings()) -> dict:
  """One run of `opt` at `multiplier` times its tuned rate on `task`."""
  lr = multiplier * TUNED[task.name][opt.label]
  out = _Run(task, opt, lr, seed, settings).train()
  out["multiplier"] = multiplier
  return out


# ---------------------------------------------------------------------------
# The per-run summary.


def _before(run: dict) -> list:
  """The measurements before the blow-up (all of them without one)."""
  b = run["blow_up"]
  return [m for m in run["measurements"] if b is None or m["step"] < b]


def _leaf(run: dict, values: list) -> str:
  """The name of the leaf with the largest value, without the brackets."""
  name = run["leaves"][int(np.argmax(values))]
  return ".".join(re.findall(r"'([^']*)'", name)) or name


def summary(run: dict) -> dict:
  """The numbers of one run that the tables report.

  Extremes are over the measurements before the blow-up (all of them
  without one); "late" ones from the end of warmup on.
  """
  before = _before(run)
  late = [m for m in before if m["step"] >= run["warmup"]]
  cross = [m["step"] for m in run["measurements"] if m["ratio"] > 1]
  at_warmup = [m for m in run["measurements"]
               if m["step"] == run["warmup"] and not m["replay"]]
  nan = math.nan
  def over(key, f, ms=before):
    return float(f([m[key] for m in ms])) if ms else nan
  top = max(before, key=lambda m: m["s_max"]) if before else None
  sharpest = max(late, key=lambda m: m["ratio"]) if late else None
  widest = max(before, key=lambda m: max(m["leaf_rms"])) if before else None
  return {
      "diverged": run["diverged"], "blow_up": run["blow_up"],
      "first_cross": cross[0] if cross else None,
      "max_ratio": over("ratio", max),
      "late_max_ratio": over("ratio", max, late),
      "late_median_ratio": over("ratio", np.median, late),
      "late_above": float(np.mean([m["ratio"] > 1 for m in late]))
                    if late else nan,
      "ratio_warmup": at_warmup[0]["ratio"] if at_warmup else nan,
      "lam_warmup": at_warmup[0]["lam"] if at_warmup else nan,
      # The top eigenvector at the sharpest measurement after warmup.
      "sharp_leaf": _leaf(run, sharpest["leaf_mass"]) if sharpest else None,
      "sharp_v_peak": sharpest["v_peak"] if sharpest else nan,
      "sharp_d": sharpest["d_at_v_peak"] if sharpest else nan,
      "inactive": over("inactive", max),
      "d_min": over("d_min", min), "d_q001": over("d_q001", min),
      "d_q01": over("d_q01", min), "d_median": over("d_median", np.median),
      "d_small": over("d_small", max),
      "s_max": over("s_max", max), "s_q999": over("s_q999", max),
      "leaf_rms": max(widest["leaf_rms"]) if widest else nan,
      "worst_leaf": _leaf(run, widest["leaf_rms"]) if widest else None,
      "d_at_s_max": top["d_at_s_max"] if top else nan,
      # The largest steps' denominators against all of them, per measurement.
      "top_d_ratio": float(np.median([m["d_median_top"] / m["d_median"]
                                      for m in before])) if before else nan,
      "top_small": over("top_small", np.mean),
      "metric": run["metric"]}


# ---------------------------------------------------------------------------
# Tables.


def _g(x, nd=3) -> str:
  if x is None:
    return "—"
  if isinstance(x, float) and math.isnan(x):
    return "nan"
  return f"{x:.{nd}g}"


def _seeds(values, nd=3) -> str:
  """Per-seed values, `a / b`."""
  return " / ".join(_g(v, nd) for v in values)


def _geo_mean(values) -> float:
  """The geometric mean of the finite values (0 if one is 0)."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values or min(values) <= 0:
    return min(values, default=math.nan)
  return float(np.exp(np.mean(np.log(values))))


def _mean(values) -> float:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(values)) if values else math.nan


def _groups(runs: list) -> dict:
  """`{(task, optimizer, multiplier): [summary per seed]}` in run order."""
  out = {}
  for run in sorted(runs, key=lambda r: r["seed"]):
    out.setdefault((run["task"], run["optimizer"], run["multiplier"]),
                   []).append(summary(run))
  return out


def _row(key) -> list:
  task, opt, mult = key
  return [task, opt, f"{mult:g}x"]


def stability_table(runs: list) -> str:
  """Divergence, blow-up and the edge of stability, per configuration:
  per-seed values `seed 0 / seed 1`, means over seeds."""
  rows = []
  for key, s in _groups(runs).items():
    rows.append(_row(key) + [
        f"{sum(x['diverged'] for x in s)}/{len(s)}",
        _seeds(x["blow_up"] for x in s),
        _seeds(x["first_cross"] for x in s),
        _seeds((x["max_ratio"] for x in s), 2),
        _g(_mean(x["late_median_ratio"] for x in s), 2),
        _seeds((x["late_max_ratio"] for x in s), 2),
        _seeds((x["late_above"] for x in s), 2),
        _g(_mean(x["metric"] for x in s), 4)])
  return report.table(
      ["task", "optimizer", "rate", "diverged", "blow-up step",
       "first λ_P > 38/η", "max λ_P·η/38 before blow-up",
       "median λ_P·η/38 from warmup (mean)", "max λ_P·η/38 from warmup",
       "share > 1 from warmup", "test metric (mean)"], rows)


def sharpness_table(runs: list) -> str:
  """Where the top eigenvector of P^-1/2 H P^-1/2 sits at the sharpest
  measurement after warmup (before the blow-up), per seed."""
  rows = []
  for key, s in _groups(runs).items():
    rows.append(_row(key) + [
        _seeds((x["late_max_ratio"] for x in s), 2),
        " / ".join(x["sharp_leaf"] or "—" for x in s),
        _seeds((x["sharp_v_peak"] for x in s), 2),
        _seeds(x["sharp_d"] for x in s)])
  return report.table(
      ["task", "optimizer", "rate", "max λ_P·η/38 from warmup",
       "leaf holding most of the eigenvector", "its largest squared entry",
       "d at that entry"], rows)


def denominator_table(runs: list) -> str:
  """The denominator and the steps before the blow-up, per configuration
  (extremes over the measurements, geometric means over seeds)."""
  rows = []
  for key, s in _groups(runs).items():
    geo = lambda k: _g(_geo_mean(x[k] for x in s))  # noqa: E731
    rows.append(_row(key) + [
        _g(max(x["inactive"] for x in s), 2), geo("d_min"), geo("d_q001"),
        geo("d_q01"), geo("d_median"), _g(max(x["d_small"] for x in s), 2),
        geo("s_max"), geo("s_q999"), geo("leaf_rms"), s[0]["worst_leaf"],
        geo("d_at_s_max"), geo("top_d_ratio"),
        _g(_mean(x["top_small"] for x in s), 2)])
  return report.table(
      ["task", "optimizer", "rate", "inactive", "min d", "d 0.1%", "d 1%",
       "median d", "d < 10ε (max)", "max step", "step 99.9%",
       "max leaf RMS step", "its leaf (seed 0)", "d at max step",
       "median d of top-0.1% steps / median d", "top-0.1% steps with d < 10ε"],
      rows)


def prediction_table(runs: list) -> str:
  """λ_P after warmup at 1x against the largest multiplier that held."""
  groups, rows = _groups(runs), []
  for task, opt in dict.fromkeys((k[0], k[1]) for k in groups):
    one = groups.get((task, opt, 1))
    if not one:
      continue
    ratio = _mean(x["ratio_warmup"] for x in one)
    mults = sorted(m for (t, o, m) in groups if (t, o) == (task, opt))
    held = [m for m in mults
            if not any(x["diverged"] for x in groups[(task, opt, m)])]
    failed = [m for m in mults if m not in held]
    rows.append([task, opt, _g(_mean(x["lam_warmup"] for x in one)),
                 _g(ratio, 2), _g(1 / ratio if ratio > 0 else math.nan, 2),
                 f"{max(held):g}x" if held else "none",
                 f"{min(failed):g}x" if failed else "none"])
  return report.table(
      ["task", "optimizer", "λ_P end of warmup (1x)", "λ_P·η/38 (1x)",
       "predicted largest rate 38/λ_P (× tuned)", "largest rate that held",
       "smallest that diverged"], rows)


def blow_up_table(runs: list, last: int = 6) -> str:
  """The last measurements up to each blow-up (the first seed that blew
  up, per configuration)."""
  rows, seen = [], set()
  for run in sorted(runs, key=lambda r: r["seed"]):
    key = (run["task"], run["optimizer"], run["multiplier"])
    if run["blow_up"] is None or key in seen:
      continue
    seen.add(key)
    b = run["blow_up"]
    for m in [m for m in run["measurements"] if m["step"] <= b][-last:]:
      rows.append(_row(key) + [
          run["seed"], "yes" if run["diverged"] else "no", m["step"] - b,
          _g(m["loss"]), _g(m["eta"]), _g(m["lam"]), _g(m["ratio"], 2),
          _g(m["v_peak"], 2), _g(m["d_at_v_peak"]), _g(m["s_max"]),
          _g(m["d_at_s_max"]), _g(m["d_median"])])
  return report.table(
      ["task", "optimizer", "rate", "seed", "diverged", "step − blow-up",
       "loss", "η", "λ_P", "λ_P·η/38", "eigvec peak v²", "d there",
       "max step", "d at max step", "median d"], rows)


def tables(runs: list) -> str:
  """All the tables, as Markdown."""
  return "\n\n".join([
      "### Stability\n\n" + stability_table(runs),
      "### What the sharpest direction sits on\n\n" + sharpness_table(runs),
      "### Denominator and steps (before the blow-up)\n\n"
      + denominator_table(runs),
      "### Does λ_P after warmup predict the largest stable rate?\n\n"
      + prediction_table(runs),
      "### The measurements up to each blow-up\n\n" + blow_up_table(runs)])


# ---------------------------------------------------------------------------
# The study's tables, each a function of the results file (docs/results/
# failure.json: every run's `summary`).

_EPS_OF = {"AdaHessian": EPS["adahessian"], "Adam": EPS["adam"]}


def results(runs: list) -> dict:
  """The results file's content: each run's summary and its key."""
  return {"script": "python -m benchmarks.study.failure",
          "machine": report_header(),
          "runs": [dict(summary(r), task=r["task"], optimizer=r["optimizer"],
                        multiplier=r["multiplier"], seed=r["seed"])
                   for r in runs]}


def report_header() -> str:
  from benchmarks.common import timing  # pylint: disable=import-outside-toplevel
  return timing.header()


def _by_config(data: dict) -> dict:
  """`{(task, optimizer): {multiplier: [summaries]}}` in file order."""
  out = {}
  for r in data["runs"]:
    out.setdefault((r["task"], r["optimizer"]), {}).setdefault(
        r["multiplier"], []).append(r)
  return out


def _num(x) -> float:
  return math.nan if x in (None, "nan") else float(x)


def doc_stability_table(data: dict) -> str:
  """Per task and optimizer, at 1x / 3x / 5x / 10x: failed runs, the first
  step with lambda_P above 38/eta (earliest seed), the largest
  lambda_P eta / 38 before the blow-up, the smallest denominator, the
  largest step and the largest per-layer RMS step (largest over seeds)."""
  rows = []
  for (task, opt), by_m in _by_config(data).items():
    mults = sorted(by_m)
    eps = _EPS_OF.get(opt, 1e-8)
    def per(fn):
      return " / ".join(fn(by_m[m]) for m in mults)
    failed = [sum(bool(r["diverged"]) for r in by_m[m]) for m in mults]
    n = len(by_m[mults[0]])
    d_min = min(_num(r["d_min"]) for m in mults for r in by_m[m])
    rows.append([
        task, opt, " / ".join(f"{m:g}×" for m in mults),
        "none" if not any(failed) else
        " / ".join(str(f) for f in failed) + f" of {n}",
        per(lambda rs: str(min(r["first_cross"] for r in rs
                               if r["first_cross"] is not None))
            if any(r["first_cross"] is not None for r in rs) else "never"),
        per(lambda rs: _g(max(_num(r["max_ratio"]) for r in rs), 2)),
        "ε" if d_min <= 1.01 * eps else f"{d_min:.2g} ({d_min / eps:.0f} ε)",
        per(lambda rs: _g(max(_num(r["s_max"]) for r in rs), 2)),
        per(lambda rs: _g(max(_num(r["leaf_rms"]) for r in rs), 2))])
  return report.table(
      ["task", "optimizer", "rate", "failed", "first λ_P > 38/η (step)",
       "largest λ_P·η/38 before the blow-up", "smallest d", "largest step",
       "largest layer RMS step"], rows)


def doc_prediction_table(data: dict) -> str:
  """lambda_P at the end of warmup at 1x, the largest rate 38/lambda_P it
  predicts, against the largest multiple that held and the smallest that
  failed."""
  rows = []
  for (task, opt), by_m in _by_config(data).items():
    one = by_m.get(1)
    if not one:
      continue
    ratio = _mean(_num(r["ratio_warmup"]) for r in one)
    mults = sorted(by_m)
    held = [m for m in mults if not any(r["diverged"] for r in by_m[m])]
    failed = [m for m in mults if m not in held]
    rows.append([task, opt, _g(_mean(_num(r["lam_warmup"]) for r in one)),
                 _g(1 / ratio if ratio > 0 else math.nan, 2),
                 f"{max(held):g}×" if held else "none",
                 f"{min(failed):g}×" if failed else "none"])
  return report.table(
      ["task", "optimizer", "λ_P after warmup (1×)",
       "predicted largest rate (× tuned)", "largest that held",
       "smallest that failed"], rows)


def values(data: dict) -> dict:
  """Numbers quoted in the prose: the LM's largest layer RMS step at 10x,
  AdaHessian's and Adam's (`leaf_rms_10x:<optimizer>`)."""
  out = {}
  for (task, opt), by_m in _by_config(data).items():
    if task == "char LM" and 10 in by_m:
      out[f"leaf_rms_10x:{opt}"] = _g(max(_num(r["leaf_rms"])
                                          for r in by_m[10]), 2)
  return out


# ---------------------------------------------------------------------------
# Running and caching.


def run_path(out: str, task_name: str, opt: so.Opt, multiplier: float,
             seed: int) -> str:
  slug = re.sub(r"[^a-z0-9]+", "-", f"{task_name} {opt.label}".lower())
  return os.path.join(out, f"{slug.strip('-')}_{multiplier:g}x_seed{seed}.json")


def _decoded(x):
  """`report.finite_json`'s strings back to floats."""
  if x in ("nan", "inf", "-inf"):
    return float(x)
  if isinstance(x, dict):
    return {k: _decoded(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_decoded(v) for v in x]
  return x


def load(path: str) -> dict:
  with open(path) as f:
    return _decoded(json.load(f))


def run_all(out: str, settings: Settings = Settings(),
            task_filter: Optional[list] = None) -> list:
  """Every configuration's run, from the cache where there."""
  runs = []
  for task in functional_tasks(settings.quick):
    if task_filter and not any(f in task.name for f in task_filter):
      continue
    for opt in OPTS:
      for mult in settings.multipliers:
        for seed in settings.seeds:
          path = run_path(out, task.name, opt, mult, seed)
          if not os.path.exists(path):
            start = time.time()
            report.save_json(path, run_one(task, opt, mult, seed, settings),
                             announce=False)
            print(f"{os.path.basename(path)}: {time.time() - start:.1f} s",
                  flush=True)
          runs.append(load(path))
  return runs


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny tasks, one seed, 1x and 10x")
  parser.add_argument("--out", default=None,
                      help="the cache folder (default results/study/failure"
                           ", or failure-quick with --quick)")
  parser.add_argument("--tasks", nargs="*", default=None,
                      help="only tasks whose name contains one of these")
  parser.add_argument("--results", default=None,
                      help="the results file the study's tables are "
                           "rendered from (default docs/results/"
                           "failure.json for a full run of every task)")
  args = parser.parse_args(argv)
  out = args.out or os.path.join(
      "results", "study", "failure-quick" if args.quick else "failure")
  start = time.time()
  runs = run_all(out, QUICK if args.quick else Settings(), args.tasks)
  text = tables(runs)
  print(text)
  with open(os.path.join(out, "tables.md"), "w") as f:
    f.write(text + "\n")
  path = args.results or (None if args.quick or args.tasks else os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
          __file__)))), "docs", "results", "failure.json"))
  if path:
    report.save_json(path, results(runs))
  print(f"\n{len(runs)} runs, {time.time() - start:.0f} s")
  return text


if __name__ == "__main__":
  main()
