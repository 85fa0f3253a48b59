"""The Gauss-Newton-Bartlett refresh step against Adam's and Hutchinson's.

For the speed suite's MLP, CNN and Transformer (``benchmarks/common``), in
one process, as medians of within-round ratios
(``benchmarks/common/timing.py``), each step over ``optax.adam``'s:

* ``hutchinson``: AdaHessian's fused refresh step with Hutchinson's
  estimator (``aho.value_grad_and_hessian``: one jvp-over-grad pass);
* ``gnb``: the same with ``estimator=aho.gnb_estimator(...)`` and the loss
  as ``aho.ggn(output_fn, aho.SoftmaxCrossEntropy(labels))``: one forward
  and the true and sampled labels' backward passes, as the library runs
  them (batched for the Transformer's sequence outputs, two ``vjp`` calls
  for the others);
* ``gnb, batched`` and ``gnb, two vjps``: the same numbers with the two
  backward passes forced into one ``jax.vmap`` of the ``vjp``, or into two
  ``vjp`` calls (the measurement behind the library's choice);
* ``gnb plain``: ``jax.grad`` plus ``update(..., value_fn=ggn_loss)``, the
  refresh as ``optax.contrib.sophia`` calls the estimator (forward and
  backward on sampled labels beside the gradient's).

Target: the fused GNB step at most 1.6x Adam's on one core (one forward and
two backward passes). Memory: XLA's temp + argument bytes of each compiled
step over Adam's (``memory_analysis``, as ``benchmarks/speed/memory.py``).

Spread: for the analysis benchmark's small tanh MLP (64-32-10, 2,410
parameters) on 256 scikit-learn digits, the coefficient of variation of one
estimate per coordinate (its standard deviation over its mean), median and
90th percentile over the coordinates: Hutchinson's exactly, from the
Hessian (Rademacher: ``sqrt(sum_{j != i} H_ij^2) / |H_ii|``), GNB's from
2,000 draws.

Usage (from the repository root)::

  python -m benchmarks.speed.gnb_cost --quick           # smoke run
  python -m benchmarks.speed.gnb_cost                   # 1 core, CPU time
  python -m benchmarks.speed.gnb_cost --threads 0       # GPU, wall time
"""

import argparse
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_optax as aho
from adahessian_optax.estimators import _gnb
from benchmarks.common import models as _models
from benchmarks.common import report as _report
from benchmarks.common import timing as _timing
from benchmarks.speed import train_steps as _steps

TARGET = 1.6  # the fused GNB step over Adam's, one core
STEPS = ("hutchinson", "gnb", "gnb, batched", "gnb, two vjps", "gnb plain")
FORCED = {"gnb, batched": True, "gnb, two vjps": False}


@contextlib.contextmanager
def _pull_back(batched):
  """While tracing, `_gnb` pulls its cotangents back `batched` or not
  (None: its own choice)."""
  if batched is None:
    yield
    return
  chosen = _gnb._pull_back  # pylint: disable=protected-access
  _gnb._pull_back = functools.partial(chosen, batched=batched)  # pylint: disable=protected-access
  try:
    yield
  finally:
    _gnb._pull_back = chosen  # pylint: disable=protected-access


def _ggn_loss(problem, batch):
  x, y = batch
  return aho.ggn(lambda p: problem.module.apply(p, x),
                 aho.SoftmaxCrossEntropy(y))


def gnb_step(problem, tx, style, batched=None):
  """The jitted GNB refresh step, ``step(params, opt_state, batch)``."""

  def step(params, opt_state, batch, refresh=None):
    del refresh
    loss = _ggn_loss(problem, batch)
    if style == "plain":
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state,
                                     params, value_fn=loss)
    else:
      with _pull_back(batched):
        _, grads, hessian = aho.value_grad_and_hessian(loss, params,
                                                       opt_state)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     hessian=hessian)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, static_argnames="refresh")


def steps(problem):
  """Name -> (jitted step, optimizer)."""
  gnb = lambda: aho.adahessian(_steps.LEARNING_RATE,
                               estimator=aho.gnb_estimator(key=0))
  hutchinson = _steps.adahessian(update_interval=1)
  out = {"adam": (_steps.train_step(problem, _steps.adam(), "adam"),
                  _steps.adam()),
         "hutchinson": (_steps.train_step(problem, hutchinson, "fused"),
                        hutchinson)}
  for name in ("gnb", "gnb, batched", "gnb, two vjps", "gnb plain"):
    tx = gnb()
    out[name] = (gnb_step(problem, tx, "plain" if name == "gnb plain"
                          else "fused", FORCED.get(name)), tx)
  return out


def memory(problem, built):
  params, batch = problem.params, problem.batch
  return {name: _report.compiled_report(step.lower(
      params, tx.init(params), batch))["temp+argument"]
          for name, (step, tx) in built.items()}


def measure(problem, rounds, block, clock):
  params, batch = problem.params, problem.batch
  built = steps(problem)
  grad = jax.jit(jax.grad(problem.loss))
  variants = [_timing.Variant("grad", _timing.jax_unit(
      lambda: grad(params, batch)))]
  for name, (step, tx) in built.items():
    variants.append(_timing.Variant(name, _timing.stepping(
        step, params, tx.init(params), batch, [None])))
  by = _timing.measure(variants, rounds, block, clock)
  bytes_ = memory(problem, built)
  return {
      "x_adam": {n: _timing.ratio(by, n, "adam") for n in ("grad",) + STEPS},
      "ms": {v.name: _timing.median_ms(v) for v in variants},
      "bytes": bytes_,
      "memory_x_adam": {n: b / bytes_["adam"] for n, b in bytes_.items()},
  }


def spread(draws=2000):
  """Median and 90th percentile over coordinates of one estimate's
  coefficient of variation, Hutchinson's and GNB's (see the docstring)."""
  from jax.flatten_util import ravel_pytree  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x[:256] / 16.0, jnp.float32), jnp.asarray(y[:256])
  params = _models.small_params("mlp", np.random.default_rng(0))
  loss = aho.ggn(lambda p: _models.mlp_logits(p, x),
                 aho.SoftmaxCrossEntropy(y))
  flat, unravel = ravel_pytree(params)
  hess = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat),
                    np.float64)
  diag = np.diag(hess)
  off = np.sqrt(np.maximum((hess ** 2).sum(axis=1) - diag ** 2, 0))
  keys = jax.random.split(jax.random.key(0), draws)
  gnb = np.asarray(jax.jit(jax.vmap(lambda k: ravel_pytree(
      aho.gnb_diagonal(loss, params, k).diagonal)[0]))(keys), np.float64)
  keep = np.abs(diag) > 1e-8 * np.abs(diag).max()
  cv = {"hutchinson": off[keep] / np.abs(diag[keep]),
        "gnb": gnb.std(axis=0)[keep] / gnb.mean(axis=0)[keep]}
  return {k: {"median": float(np.median(v)),
              "p90": float(np.quantile(v, 0.9))} for k, v in cv.items()}


def tables(results, clock_name):
  fmt = _report.fmt
  cell = lambda r: f"{fmt(r['median'])} ({fmt(r['q25'])}–{fmt(r['q75'])})"
  rows = [[name] + [cell(res["x_adam"][n]) for n in ("grad",) + STEPS]
          + [fmt(res["ms"]["adam"], 1)] for name, res in results.items()]
  text = (f"### Refresh step x Adam's ({clock_name}): median over rounds "
          "(quartiles)\n"
          + _report.table(["model", "grad"] + list(STEPS) + ["Adam ms"], rows))
  rows = [[name] + [f"{res['bytes'][n] / 1e6:.1f} MB "
                    f"({res['memory_x_adam'][n]:.2f})"
                    for n in ("adam",) + STEPS]
          for name, res in results.items()]
  text += ("\n\n### Temp + argument bytes of each compiled step, in brackets "
           "over Adam's\n" + _report.table(["model", "adam"] + list(STEPS),
                                           rows))
  return text


# ---------------------------------------------------------------------------
# The docs' tables, each a function of the results file (``--json``,
# docs/results/gnb_cost.json).

_MODELS = {"mlp": "MLP, 0.93M parameters, batch 128",
           "cnn": "CNN, batch 32 of 32×32×3",
           "transformer": "Transformer, batch 16×64 tokens, vocabulary 512"}
_COLUMNS = {"grad": "gradient", "hutchinson": "Hutchinson, fused",
            "gnb": "GNB, fused", "gnb, batched": "GNB, batched",
            "gnb, two vjps": "GNB, two `vjp` calls", "gnb plain": "GNB, plain"}


def time_table(data) -> str:
  """Each step's time over Adam's step (medians of within-round ratios)."""
  results = data["results"]
  return _report.table(
      ["model"] + list(_COLUMNS.values()) + ["Adam's step"],
      [[_MODELS.get(name, name)]
       + [_report.fmt(res["x_adam"][n]["median"]) for n in _COLUMNS]
       + [f"{res['ms']['adam']:.1f} ms"] for name, res in results.items()])


def memory_table(data) -> str:
  """Each compiled step's temporary plus argument bytes over Adam's."""
  cols = ("hutchinson", "gnb", "gnb, batched", "gnb, two vjps")
  return _report.table(
      ["model"] + [_COLUMNS[c] for c in cols],
      [[name] + [_report.fmt(res["memory_x_adam"][c]) for c in cols]
       for name, res in data["results"].items()])


def spread_table(data) -> str:
  """The coefficient of variation of one estimate per coordinate."""
  return _report.table(
      ["spread of one estimate (small tanh MLP, 256 digits)", "median",
       "90th percentile"],
      [[k, _report.fmt(v["median"]), _report.fmt(v["p90"])]
       for k, v in data["spread"].items()])


def values(data) -> dict:
  """Numbers quoted in the prose: ``<step>:<model>`` over Adam's."""
  out = {f"{n}:{name}": _report.fmt(res["x_adam"][n]["median"])
         for name, res in data["results"].items() for n in _COLUMNS}
  gnb = [res["x_adam"]["gnb"]["median"] for res in data["results"].values()]
  hut = [res["x_adam"]["hutchinson"]["median"]
         for res in data["results"].values()]
  out["gnb_range"] = f"{min(gnb):.1f}–{max(gnb):.1f}"
  out["hutchinson_range"] = f"{min(hut):.1f}–{max(hut):.1f}"
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--threads", type=int, choices=(0, 1, 2), default=1,
                      help="1: one core, CPU time (default); 2: wall time; "
                           "0: wall time, no pinning (GPU)")
  parser.add_argument("--models", default="mlp,cnn,transformer")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--block", type=float, default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  clock = _timing.configure(args.threads)
  rounds = args.rounds or (3 if args.quick else 15)
  block = args.block or (0.02 if args.quick else 0.1)
  clock_name = ("process CPU time, 1 core" if args.threads == 1 else
                "wall time, 2 threads" if args.threads == 2 else "wall time")
  print(_timing.header())
  print(f"clock: {clock_name}; rounds={rounds}, block={block}s")
  results = {}
  for problem in _models.make_problems(args.models.split(","), args.quick):
    print(f"\n[{problem.name}] {_models.n_params(problem.params):,} "
          f"parameters, input {problem.inputs.shape}", flush=True)
    results[problem.name] = measure(problem, rounds, block, clock)
    _report.save_json(args.json, {"results": results, "partial": True},
                      announce=False)
  print()
  print(tables(results, clock_name))
  cv = spread(200 if args.quick else 2000)
  print("\n### Spread of one estimate: coefficient of variation per "
        "coordinate (small tanh MLP, 256 digits)\n" + _report.table(
            ["estimator", "median", "90th percentile"],
            [[k, _report.fmt(v["median"]), _report.fmt(v["p90"])]
             for k, v in cv.items()]))
  checks = [(f"{name}: fused GNB step {res['x_adam']['gnb']['median']:.2f}x "
             f"Adam's (target <= {TARGET})",
             res["x_adam"]["gnb"]["median"] <= TARGET)
            for name, res in results.items()]
  print("\n### Targets\n\n" + _report.checklist(checks))
  _report.save_json(args.json, {"results": results, "spread": cv,
                                "rounds": rounds,
                                "threads": args.threads, "quick": args.quick,
                                "backend": jax.default_backend()})
  return results


if __name__ == "__main__":
  main()
