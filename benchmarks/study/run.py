"""Does AdaHessian deliver what the paper claims? The study (docs/study.md).

Five tasks (an axis-aligned and a rotated ill-conditioned quadratic, an MLP
and the main job's CNN on the digits, a character-level Transformer LM) and
eight optimizers (AdaHessian, Adam, AdamW, SGD with momentum, Sophia-H,
Adan, SGD-SaI, Shampoo), plus AdaHessian's variants. Protocol:

* each optimizer's peak learning rate is tuned on a log grid (half-decade
  steps, extended while the best is at an edge) by validation loss, never on
  the test set;
* the tuned rate is re-run with 5 seeds, and 0.5x, 2x, 3x, 5x and 10x it
  with 3 seeds, on the test split (learning-rate robustness);
* AdaHessian's options (Hessian every k steps, probes, block size, Hessian
  on a sub-batch) at its tuned rate, 5 seeds; remedies for large rates as
  optimizers of their own.

Every run's result is cached as one JSON file under ``--out`` (default
``results/study/``), named by its configuration, so an interrupted study
resumes. Parts fit in a CPU session each; from the repository root::

    python -m benchmarks.study.run --part small    # quadratics and the MLP
    python -m benchmarks.study.run --part cnn      # the digits CNN
    python -m benchmarks.study.run --part lm       # the character-level LM
    python -m benchmarks.study.run --report        # tables, plots from cache
    python -m benchmarks.study.run --quick --out /tmp/q   # everything, tiny

The second round (``--round 2``) adds Sophia-G and AdaHessian with the
Gauss-Newton-Bartlett estimate under the same protocol, and remedies for
large rates under the light one, on the same tasks; its part ``lm-large``
is a harder LM (4 layers) with AdamW, AdaHessian, Sophia-G, AdaHessian-GNB
and the clip, under a lighter protocol (one tuning seed on a three-point
grid, three seeds at the tuned rate, one at the other multiples)::

    python -m benchmarks.study.run --round 2 --part small cnn lm lm-large
    python -m benchmarks.study.run --round 2 --report

What a step costs against Adam's is the speed suite's question
(``python -m benchmarks.speed.step_cost``), not the study's.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings

import numpy as np
from tqdm import tqdm

from benchmarks.common import report
from benchmarks.common import timing
from benchmarks.study import optimizers as so
from benchmarks.study import report as study_report
from benchmarks.study import tasks as study_tasks

PARTS = study_report.PARTS
ROUNDS = {1: PARTS[:3], 2: PARTS}
MULTIPLIERS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
# Seeds: tuning, the tuned rate, the other multipliers (disjoint from tuning).
TUNE_SEEDS, TEST_SEEDS, SENS_SEEDS = (100, 101), tuple(range(5)), (0, 1, 2)
# Remedies get a lighter protocol: one tuning seed, two at other multipliers.
LIGHT = ((100,), TEST_SEEDS, (0, 1))
# Seconds per run measured on the shared 2-core machine (all optimizers).
SECONDS = {"quadratic, axis-aligned": 0.2, "quadratic, rotated": 0.2,
           "MLP": 1.0, "digits CNN": 6.0, "char LM": 6.5,
           "char LM, 4 layers": 45.0}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Seeds of each stage; `grid_points` > 0 cuts the grids (--quick)."""

  tune_seeds: tuple
  test_seeds: tuple
  sens_seeds: tuple
  grid_points: int = 0


FULL = Protocol(TUNE_SEEDS, TEST_SEEDS, SENS_SEEDS)
QUICK = Protocol((100,), (0, 1), (0,), grid_points=2)
# The harder LM's: a run there costs about ten of the small LM's.
LARGE = Protocol((100,), (0, 1, 2), (0,))


class Cache:
  """One JSON file per run, named by task, optimizer, split, rate, seed."""

  def __init__(self, root: str, quick: bool):
    self.root, self.quick = root, quick
    self.hits = self.misses = 0
    self.seconds = 0.0  # of every run served, cached or not

  def path(self, task, opt, split, lr, seed) -> str:
    config = json.dumps({"task": task.name, "opt": dataclasses.asdict(opt),
                         "split": split, "lr": float(f"{lr:.6g}"),
                         "seed": seed, "quick": self.quick}, sort_keys=True)
    digest = hashlib.sha1(config.encode()).hexdigest()[:10]
    name = f"{opt.label}_{split}_lr{lr:.4g}_s{seed}_{digest}.json"
    return os.path.join(self.root, "runs", _slug(task.name), _slug(name))

  def run(self, task, opt, lr, seed, split) -> dict:
    path = self.path(task, opt, split, lr, seed)
    if os.path.exists(path):
      self.hits += 1
      with open(path) as f:
        result = json.load(f)
      self.seconds += result["seconds"]
      return result
    self.misses += 1
    start = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      result = study_tasks.run(task, opt, lr, seed, split)
    result.update(seconds=time.perf_counter() - start, lr=lr, seed=seed)
    self.seconds += result["seconds"]
    report.save_json(path, result, indent=None, announce=False)
    return result


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def _number(x) -> float:
  return float(x)


def _diverged(r) -> bool:
  """Judged again from the cached curve, so that a cache made under an
  earlier rule follows the current one; a classifier that ends at no more
  than twice chance accuracy failed too (a blow-up that killed every ReLU
  ends at chance with a loss of ln 10, which can be below 90% of the
  first step's)."""
  chance = r.get("chance")
  return (study_tasks.diverged([_number(v) for v in r["train_loss"]],
                               _number(r["final_train_loss"]))
          or (chance is not None and _number(r["metric"][-1]) <= 2 * chance))


def score(runs) -> float:
  """Tuning score: mean over seeds of log(final validation loss)."""
  values = []
  for r in runs:
    loss = np.mean([_number(v) for v in r["eval_loss"][-2:]])
    if _diverged(r) or not np.isfinite(loss) or loss <= 0:
      return math.inf
    values.append(math.log(loss))
  return float(np.mean(values))


def lr_of(exponent: int) -> float:
  return float(f"{10 ** (exponent / 2):.4g}")


def tune(cache, task, opt, protocol, bar) -> dict:
  """The best rate of the grid, extending it while the best is at an edge
  (by two points at most on each side)."""
  lo, hi = opt.grid
  if protocol.grid_points:
    lo = (lo + hi) // 2
    hi = lo + protocol.grid_points - 1
  first, last, scores = lo, hi, {}
  while True:
    for e in range(lo, hi + 1):
      if e not in scores:
        scores[e] = score([cache.run(task, opt, lr_of(e), s, "val")
                           for s in protocol.tune_seeds])
        bar.update(len(protocol.tune_seeds))
    best = min(scores, key=lambda e: (scores[e], e))
    extend = not protocol.grid_points and math.isfinite(scores[best])
    if extend and best == lo and lo > first - 2:
      lo -= 1
    elif extend and best == hi and hi < last + 2:
      hi += 1
    else:
      break
  return {"lr": lr_of(best), "edge": best in (lo, hi),
          "grid": {lr_of(e): s for e, s in sorted(scores.items())}}


def sensitivity(cache, task, opt, lr, protocol, bar) -> dict:
  """Runs at each multiple of the tuned rate, on the test split."""
  out = {}
  for m in MULTIPLIERS:
    seeds = protocol.test_seeds if m == 1.0 else protocol.sens_seeds
    out[m] = [_summary(cache.run(task, opt, m * lr, s, "test"))
              for s in seeds]
    bar.update(len(seeds))
  return out


def _summary(r) -> dict:
  """What the report needs of a run (curves kept for the tuned rate)."""
  return {"metric": _number(r["metric"][-1]), "diverged": _diverged(r),
          "final_train_loss": _number(r["final_train_loss"]),
          "eval_loss": [_number(v) for v in r["eval_loss"]],
          "seconds": r["seconds"]}


def study_optimizer(cache, task, opt, protocol, bar) -> dict:
  tuned = tune(cache, task, opt, protocol, bar)
  return {"label": opt.label, "tuned": tuned,
          "sensitivity": sensitivity(cache, task, opt, tuned["lr"], protocol,
                                     bar)}


def ablations(cache, task, lr, protocol, quick, bar) -> dict:
  """AdaHessian's options at its tuned rate, on the test split."""
  out = {}
  for opt in so.ablations(task, quick):
    out[opt.label] = [_summary(cache.run(task, opt, lr, s, "test"))
                      for s in protocol.test_seeds]
    bar.update(len(protocol.test_seeds))
  return out


def plan(task, part: str, study_round: int, quick: bool) -> list:
  """`[(optimizer, protocol)]` of one task in one round of the study."""
  full, light = (QUICK, QUICK) if quick else (FULL, Protocol(*LIGHT))
  if part == "lm-large":
    return [(o, QUICK if quick else LARGE) for o in so.large_lm(quick)]
  if study_round == 2:
    optimizers, remedies = so.second_round(quick)
  else:
    optimizers, remedies = so.baselines(task, quick), so.remedies(quick)
  return [(o, full) for o in optimizers] + [(o, light) for o in remedies]


def planned_runs(task, plans, ablation_seeds: int, quick) -> int:
  """Runs of one task before grid extensions (for the estimate)."""
  def per_opt(p, opt):
    grid = p.grid_points or opt.grid[1] - opt.grid[0] + 1
    return (grid * len(p.tune_seeds) + len(p.test_seeds)
            + (len(MULTIPLIERS) - 1) * len(p.sens_seeds))
  return (sum(per_opt(p, o) for o, p in plans)
          + len(so.ablations(task, quick)) * ablation_seeds)


def run_part(part, args) -> None:
  protocol = QUICK if args.quick else FULL
  cache = Cache(args.out, args.quick)
  tasks = study_tasks.tasks(args.quick)[part]
  first = args.round == 1
  plans = {t.name: [(o, p) for o, p in plan(t, part, args.round, args.quick)
                    if not args.only or o.label in args.only]
           for t in tasks}
  planned = {t.name: planned_runs(
      t, plans[t.name], len(protocol.test_seeds) if first else 0, args.quick)
             for t in tasks}
  total = sum(planned.values())
  estimate = sum(n * SECONDS[name] for name, n in planned.items())
  print(timing.header())
  print(f"part {part}: about {total} runs (some cached), at most "
        f"~{estimate / 60:.0f} min on 2 cores", flush=True)
  start = time.perf_counter()
  summary = {}
  bar = tqdm(total=total, desc=part, disable=args.no_progress,
             dynamic_ncols=True)
  for task in tasks:
    bar.set_postfix(task=task.name)
    results = {o.label: study_optimizer(cache, task, o, p, bar)
               for o, p in plans[task.name]}
    summary[task.name] = {
        "metric": task.metric, "higher_is_better": task.higher_is_better,
        "optimizers": results,
        "ablations": ablations(
            cache, task, results[so.ADAHESSIAN.label]["tuned"]["lr"],
            protocol, args.quick, bar) if first and not args.only else {}}
  bar.close()
  elapsed = time.perf_counter() - start
  print(f"part {part}: {cache.misses} runs done, {cache.hits} from the "
        f"cache, {elapsed / 60:.1f} min", flush=True)
  report.save_json(os.path.join(
      args.out, study_report.summary_name(part, args.round)),
                   {"tasks": summary, "minutes": cache.seconds / 60,
                    "runs": cache.misses + cache.hits,
                    "machine": timing.header()}, announce=False)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", nargs="+", choices=PARTS, default=[],
                      help="parts to run (default with --quick: all)")
  parser.add_argument("--round", type=int, choices=(1, 2), default=1,
                      help="the study's first round or its second")
  parser.add_argument("--only", nargs="+", default=[], metavar="LABEL",
                      help="only these optimizers (to share a part between "
                           "processes; run the part again without it, from "
                           "the cache, for its whole summary)")
  parser.add_argument("--report", action="store_true",
                      help="tables and plots from the cached parts")
  parser.add_argument("--quick", action="store_true",
                      help="a tiny version of everything (tests)")
  parser.add_argument("--out", default=os.path.join("results", "study"))
  parser.add_argument("--docs", action="store_true",
                      help="with --report: also write docs/images/study_*.png")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  parts = args.part or (list(ROUNDS[args.round]) if args.quick else [])
  if not parts and not args.report:
    parser.error("give --part, --report or --quick")
  if args.round == 1 and "lm-large" in parts:
    parser.error("the part lm-large belongs to the second round (--round 2)")
  for part in parts:
    run_part(part, args)
  if args.report or args.quick:
    study_report.write(args.out, docs=args.docs and not args.quick,
                       study_round=args.round)


if __name__ == "__main__":
  main()
