"""How accurate are finite-difference Hessian-vector products?

``aho.finite_difference`` takes Hessian-vector products from differences of
gradients (forward: one more gradient; central: two), for models whose
kernels have no forward-mode rule. This script measures their relative error
``||Hv_fd - Hv|| / ||Hv||`` against the exact product, computed in float64
(``jax.jvp`` of ``jax.grad``), with the model and the difference in float32
and in bfloat16, on the analysis benchmark's networks (the tanh MLP and the
CNN on digits) and the speed suite's small Transformer; 8 Rademacher vectors
each, median and largest error. Beside them, the exact forward-over-reverse
product computed in the same dtype: the rounding floor of that dtype. The
relative step is the library's default (``eps^(1/2)`` forward,
``eps^(1/3)`` central) and a tenth and ten times it.

Writes ``docs/results/finite_difference.json``; ``accuracy_table`` renders
the docs' table from it. About 1 minute on one core::

  python -m benchmarks.analysis.finite_difference
"""

import argparse
import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import adahessian_optax as aho  # noqa: E402
from adahessian_optax.operators import _finite_difference  # noqa: E402
from benchmarks.analysis import problems  # noqa: E402
from benchmarks.common import models  # noqa: E402
from benchmarks.common import report  # noqa: E402

DTYPES = ("float32", "bfloat16")
STEPS = (0.1, 1.0, 10.0)  # multiples of the default relative step
N_VECTORS = 8


def _problems():
  """name -> (loss(params, batch), params, batch), params in float64."""
  images, labels = problems.load_data()
  batch = problems.batch_of(images, labels, 256)
  out = {}
  for name in ("mlp", "cnn"):
    problem = problems.make_problem(name, batch, quick=True)
    out[name] = (lambda p, b, name=name: problems.loss_fn(name, p, b),
                 problem.params, problem.batch)
  (transformer,) = models.make_problems(["transformer"], quick=True)
  module = transformer.module

  def loss(p, b):
    x, y = b
    return optax.softmax_cross_entropy_with_integer_labels(
        module.apply(p, x), y).mean()
  out["transformer"] = (loss, transformer.params, transformer.batch)
  return out


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _vectors(params, n):
  keys = jax.random.split(jax.random.key(0), n)
  return [jax.tree.map(
      lambda a, k=k: jax.random.rademacher(k, a.shape, jnp.float64), params)
          for k in keys]


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree.leaves(tree)])


def measure(loss, params, batch):
  """{dtype: {"exact in dtype": errors, "forward x1": errors, ...}}."""
  params64, batch64 = _cast(params, jnp.float64), _cast(batch, jnp.float64)
  grad64 = jax.grad(loss)
  exact = jax.jit(lambda v: jax.jvp(lambda p: grad64(p, batch64),
                                    (params64,), (v,))[1])
  vectors = _vectors(params64, N_VECTORS)
  references = [_flat(exact(v)) for v in vectors]
  out = {}
  for dtype in DTYPES:
    p, b = _cast(params, dtype), _cast(batch, dtype)
    grad = jax.grad(loss)
    in_dtype = jax.jit(lambda v: jax.jvp(lambda q: grad(q, b), (p,),
                                         (v,))[1])
    rows = {"exact in dtype": [in_dtype(_cast(v, dtype)) for v in vectors]}
    for method in ("forward", "central"):
      default = _finite_difference.default_step(jnp.dtype(dtype), method)
      for multiple in STEPS:
        if default * multiple >= 1:  # bfloat16's central step x10: no step
          continue
        op = aho.curvature_operator(
            aho.finite_difference(loss, method=method,
                                  step=default * multiple),
            p, batch=b)
        product = jax.jit(op.matvec)
        rows[f"{method} x{multiple:g}"] = [product(_cast(v, dtype))
                                          for v in vectors]
    out[dtype] = {}
    for row, products in rows.items():
      errors = [np.linalg.norm(_flat(h) - r) / np.linalg.norm(r)
                for h, r in zip(products, references)]
      out[dtype][row] = {"median": float(np.median(errors)),
                         "max": float(np.max(errors))}
  return out


def accuracy_table(data: dict) -> str:
  """The docs' table: median (largest) relative error per model and dtype,
  at the default step."""
  names = list(data["models"])
  header = ["product"] + [f"{name}, {dtype}" for dtype in DTYPES
                          for name in names]
  rows = []
  for row, label in (("exact in dtype", "jvp of grad, in the dtype"),
                     ("forward x1", "forward difference"),
                     ("central x1", "central difference"),
                     ("forward x10", "forward, 10x the step"),
                     ("central x10", "central, 10x the step"),
                     ("central x0.1", "central, 0.1x the step")):
    cells = []
    for dtype in DTYPES:
      for name in names:
        e = data["models"][name][dtype].get(row)
        cells.append("-" if e is None else
                     f"{e['median']:.1e} ({e['max']:.1e})")
    rows.append([label] + cells)
  return report.table(header, rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("docs", "results",
                                                    "finite_difference.json"))
  args = parser.parse_args(argv)
  results = {"jax": jax.__version__, "vectors": N_VECTORS,
             "steps": list(STEPS), "models": {}}
  for name, (loss, params, batch) in _problems().items():
    results["models"][name] = measure(loss, params, batch)
    print(name, {d: {r: f"{v['median']:.1e}" for r, v in rows.items()}
                 for d, rows in results["models"][name].items()}, flush=True)
  print(accuracy_table(results))
  report.save_json(args.out, results)


if __name__ == "__main__":
  main()
