"""The memory of AdaHessian's steps against Adam's, from XLA's buffer plans.

For each benchmark model, the compiled programs' temporary plus argument
bytes (``memory_analysis``; deterministic, no timing): the gradient and the
Hessian-vector product alone, the Adam step, AdaHessian's refresh step
(fused and plain), its step without a refresh, and the fused refresh step
with the Hessian on half the batch or with the batch in 2 or 4 chunks
(``aho.sub_batch_value_fn(..., chunks=c)``), with the optimizer states'
bytes. Target: a refresh step of the Transformer at most 1.5x Adam's.

Usage (from the repository root)::

  python -m benchmarks.speed.memory [--quick] [--json out.json]
"""

import argparse

import jax

from benchmarks.common import models as _models
from benchmarks.common import report as _report
from benchmarks.common import timing as _timing
from benchmarks.speed import train_steps as _steps

TARGET = 1.5  # the Transformer's refresh step over Adam's


def programs(problem, quick):
  """Name -> lowered program."""
  params, batch = problem.params, problem.batch
  adam, ah = _steps.adam(), _steps.adahessian()
  lowered = {
      "grad": jax.jit(jax.grad(problem.loss)).lower(params, batch),
      "hvp": jax.jit(lambda p, t, b: jax.jvp(
          jax.grad(lambda q: problem.loss(q, b)), (p,), (t,))).lower(
              params, params, batch),
      "adam": _steps.train_step(problem, adam, "adam").lower(
          params, adam.init(params), batch),
  }
  variants = {"fused": {}, "plain": {}, "no refresh": {},
              "fused, f=1/2": {"fraction": 0.5},
              "fused, chunks=2": {"chunks": 2}}
  if not quick:
    variants["fused, chunks=4"] = {"chunks": 4}
  for name, kwargs in variants.items():
    style = "fused" if name.startswith("fused") or name == "no refresh" else (
        "plain")
    step = _steps.train_step(problem, ah, style, **kwargs)
    lowered[name] = step.lower(params, ah.init(params), batch,
                               refresh=name != "no refresh")
  states = {"adam": adam.init(params), "adahessian": ah.init(params)}
  return lowered, states


def measure(problem, quick):
  lowered, states = programs(problem, quick)
  reports = {name: _report.compiled_report(lo) for name, lo in lowered.items()}
  adam = reports["adam"]["temp+argument"]
  return {
      "bytes": {name: r["temp+argument"] for name, r in reports.items()},
      "over_adam": {name: r["temp+argument"] / adam
                    for name, r in reports.items()},
      "heavy_ops": {name: r["heavy_ops"] for name, r in reports.items()},
      "state_bytes": {k: _models.tree_bytes(s) for k, s in states.items()},
      "param_bytes": _models.tree_bytes(problem.params),
  }


def report(results):
  names = list(next(iter(results.values()))["bytes"])
  rows = []
  for model, res in results.items():
    rows.append([model, f"{res['param_bytes']:,}",
                 f"{res['state_bytes']['adahessian'] - res['state_bytes']['adam']:+,}"]
                + [f"{res['bytes'][n] / 1e6:.1f} MB ({res['over_adam'][n]:.2f})"
                   for n in names])
  text = ("### Temp + argument bytes of each program, in brackets over the "
          "Adam step's\n" + _report.table(
              ["model", "param bytes", "state vs Adam's"] + names, rows))
  text += "\n\n### Matmuls + convolutions in the optimized HLO\n" + (
      _report.table(["model"] + names, [
          [model] + [str(res["heavy_ops"][n]) for n in names]
          for model, res in results.items()]))
  return text


# ---------------------------------------------------------------------------
# The docs' tables, each a function of the results file (``--json``,
# docs/results/memory.json).


def memory_table(data) -> str:
  """Temporary plus argument bytes of each program, in brackets over the
  Adam step's; the optimizer state's bytes over Adam's."""
  results = data["results"]
  names = list(next(iter(results.values()))["bytes"])
  rows = []
  for model, res in results.items():
    extra = res["state_bytes"]["adahessian"] - res["state_bytes"]["adam"]
    rows.append([model, f"{extra:+,} B"] + [
        f"{res['bytes'][n] / 1e6:.1f} MB"
        + ("" if n == "adam" else f" ({res['over_adam'][n]:.2f})")
        for n in names])
  return _report.table(["model", "state vs Adam's"]
                       + [_LABELS.get(n, n) for n in names], rows)


def heavy_ops_table(data) -> str:
  """Matmuls and convolutions in each program's optimized HLO."""
  results = data["results"]
  names = list(next(iter(results.values()))["heavy_ops"])
  return _report.table(
      ["model"] + [_LABELS.get(n, n) for n in names],
      [[model] + [str(res["heavy_ops"][n]) for n in names]
       for model, res in results.items()])


def refresh_table(data) -> str:
  """A refresh step, a step without one, and `chunks`, over Adam's step."""
  cols = {"fused": "refresh step", "no refresh": "step without a refresh",
          "fused, chunks=2": "refresh, `chunks=2`",
          "fused, chunks=4": "refresh, `chunks=4`"}
  return _report.table(
      ["model"] + list(cols.values()),
      [[_MODELS.get(model, model)] + [
          f"{res['over_adam'][n]:.2f}" if n in res["over_adam"] else "—"
          for n in cols] for model, res in data["results"].items()])


def values(data) -> dict:
  """Ratios quoted in the prose, ``<program>:<model>`` over Adam's step."""
  return {f"{n}:{model}": f"{r:.2f}"
          for model, res in data["results"].items()
          for n, r in res["over_adam"].items()}


_LABELS = {"grad": "grad", "hvp": "HVP", "adam": "Adam step",
           "fused": "fused refresh", "plain": "plain refresh"}
_MODELS = {"mlp": "MLP, 0.93M parameters, batch 128",
           "cnn": "CNN, batch 32 of 32×32×3",
           "transformer": "Transformer, batch 16 × 64 tokens"}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--models", default="mlp,cnn,transformer")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  print(_timing.header())
  results = {p.name: measure(p, args.quick)
             for p in _models.make_problems(args.models.split(","),
                                            args.quick)}
  print(report(results))
  checks = []
  for model, res in results.items():
    diff = res["state_bytes"]["adahessian"] - res["state_bytes"]["adam"]
    checks.append((f"{model}: optimizer state = Adam's + {diff} bytes",
                   0 <= diff <= 64))
    if model == "transformer":
      for name in ("fused", "fused, chunks=2"):
        got = res["over_adam"][name]
        checks.append((f"transformer: {name} refresh step {got:.2f}x Adam's "
                       f"step (target <= {TARGET})", got <= TARGET))
  print("\n### Targets\n\n" + _report.checklist(checks))
  _report.save_json(args.json, {"results": results, "quick": args.quick,
                                "backend": jax.default_backend()})
  return results


if __name__ == "__main__":
  main()
