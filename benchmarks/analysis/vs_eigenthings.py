"""Hessian and GGN analysis against hessian-eigenthings and PyHessian, at
equal numbers of products.

The MLP and the CNN of ``benchmarks/analysis/problems.py`` (a few thousand
parameters, briefly trained on digits, batch 512), the same weights copied
into torch. Every task gets the same number of matrix-vector products on
every side, and each answer is checked against ``numpy.linalg.eigvalsh`` of
the exact Hessian or GGN:

- top-1: ours ``hessian_eigenvalues(k=1)``, n Lanczos steps;
  hessian-eigenthings ``lanczos(which="LA")`` with ``max_iter`` n;
  PyHessian's power iteration, n iterations (``tol=0``).
- top-5: the same with ``k=5``; PyHessian's deflated power iteration,
  n/5 iterations per eigenvalue.
- trace: Hutchinson, 100 Rademacher probes on every side (``hessian_trace``,
  ``hutchinson``, PyHessian's ``trace`` with ``tol=0``).
- trace hutch++: Hutch++ with 99 products (``method="hutch++"``,
  ``hutch_plus_plus``); PyHessian has none.
- esd: stochastic Lanczos quadrature, probes x steps (``hessian_spectrum``,
  ``spectral_density``, PyHessian's ``density``).
- ggn top-1: top-1 of the generalized Gauss-Newton matrix, ours through
  ``aho.ggn(logits_fn, aho.SoftmaxCrossEntropy(labels))``, theirs through
  ``GGNOperator``; PyHessian has no GGN.

n is 20 for top-1 and 40 for top-5 (full run). Our Lanczos stops once its
Ritz residuals meet ``tol``; it gets ``tol=1e-30`` so that it runs the
peer's fixed ``max_iter`` unless its residuals fall below 1e-30 ||H||
first (top-5 does: ``info.n_steps``, the products used, is reported).
hessian-eigenthings' products are counted by wrapping its operators'
``matvec``, PyHessian's by wrapping its ``hessian_vector_product``.

Each of our functions is timed called outside jit (a Python loop around
compiled products) and inside ``jax.jit`` (one program). Compile time is
reported apart: the first call outside jit (in task order, so a later task
reuses the products an earlier one compiled) and ``lower().compile()``
under jit, with the peers' first calls beside them. All tasks and sides of
a model, and one product alone on each side, are timed in the same rounds
(``common.timing``: rotating order, medians, within-round ratios);
``--threads 1`` (default) pins the process to one core and reads its CPU
time, for the compiles too.

hessian-eigenthings redoes the forward and backward pass for every Hessian
product (and two forwards for every GGN product); PyHessian keeps one
backward graph for the batch and backpropagates through it again per
product; ours takes the forward and backward pass once per call
(``jax.linearize`` of the gradient) and then a tangent pass per product.

Install the peers (CPU; torch first, any other torch request pulls CUDA)::

  pip install torch==2.13.0
  pip install --no-deps hessian-eigenthings==1.0.0a5 pyhessian==0.1

Usage (from the repository root)::

  python -m benchmarks.analysis.vs_eigenthings --quick   # smoke run, 1-2 min
  python -m benchmarks.analysis.vs_eigenthings           # full run, ~11 min
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import adahessian_optax as aho
from benchmarks.analysis import peers
from benchmarks.analysis import problems
from benchmarks.common import report
from benchmarks.common import timing

NO_EARLY_STOP = 1e-30  # our Lanczos' tol: never met, so all n_steps run
SIDES = ("ours outside jit", "ours in jit", "eigenthings", "pyhessian")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: small batch, few products, one round")
  parser.add_argument("--threads", type=int, choices=(1, 2), default=1)
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed rounds (default 5; 1 with --quick)")
  parser.add_argument("--out", default=os.path.join("results", "bench"),
                      help="folder for vs_eigenthings.{md,json}; '' for none")
  parser.add_argument("--json", default=None,
                      help="also write the results here (the docs' file, "
                      "docs/results/vs_eigenthings.json)")
  parser.add_argument("--previous", default=None,
                      help="an earlier version's vs_eigenthings.json, kept "
                      "in this run's results for versions_table")
  return parser.parse_args(argv)


def settings(quick: bool) -> dict:
  """Products per task: Lanczos steps, probes, probes x steps."""
  if quick:
    return {"top-1": 8, "top-5": 15, "trace": 12, "trace hutch++": 12,
            "esd": (2, 10), "ggn top-1": 8}
  return {"top-1": 20, "top-5": 40, "trace": 100, "trace hutch++": 99,
          "esd": (10, 50), "ggn top-1": 20}


def task_names(s: dict) -> list:
  n_v, m = s["esd"]
  return ["top-1", "top-5", "trace", "trace hutch++", f"esd {n_v}x{m}",
          "ggn top-1"]


# --------------------------------------------------------------------------
# The three sides' tasks. Each returns (result, products).


def ours_tasks(s: dict) -> dict:
  """name -> (curvature, fn(loss, params)); curvature "hessian" or "ggn"."""

  def top(k, n):
    def fn(loss, p):
      values, _, info = aho.hessian_eigenvalues(loss, p, 0, k=k,
                                                tol=NO_EARLY_STOP, n_steps=n)
      return values, info.n_steps
    return fn

  def trace(method, n):
    def fn(loss, p):
      return aho.hessian_trace(loss, p, 0, n_samples=n,
                               method=method).estimate, n
    return fn

  def spectrum(n_v, m):
    def fn(loss, p):
      out = aho.hessian_spectrum(loss, p, 0, n_samples=n_v, n_steps=m)
      return (out.nodes, out.weights), n_v * m
    return fn

  names = task_names(s)
  fns = [top(1, s["top-1"]), top(5, s["top-5"]),
         trace("hutchinson", s["trace"]),
         trace("hutch++", s["trace hutch++"]), spectrum(*s["esd"]),
         top(1, s["ggn top-1"])]
  return {name: ("ggn" if name.startswith("ggn") else "hessian", fn)
          for name, fn in zip(names, fns)}


def eigenthings_tasks(s: dict) -> dict:
  """name -> (operator name, fn(operator) -> result)."""
  import hessian_eigenthings as he  # pylint: disable=import-outside-toplevel

  def top(k, n):
    return lambda op: he.lanczos(op, k=k, max_iter=n, which="LA",
                                 seed=0).eigenvalues.numpy()

  def density(n_v, m):
    def fn(op):
      out = he.spectral_density(op, num_runs=n_v, lanczos_steps=m, seed=0)
      return out.raw_eigenvalues.numpy(), out.raw_weights.numpy()
    return fn

  names = task_names(s)
  fns = [top(1, s["top-1"]), top(5, s["top-5"]),
         lambda op: he.hutchinson(op, num_samples=s["trace"],
                                  seed=0).estimate,
         lambda op: he.hutch_plus_plus(op, num_matvecs=s["trace hutch++"],
                                       seed=0).estimate,
         density(*s["esd"]), top(1, s["ggn top-1"])]
  return {name: ("ggn" if name.startswith("ggn") else "hessian", fn)
          for name, fn in zip(names, fns)}


def pyhessian_tasks(s: dict) -> dict:
  """name -> fn(pyhessian.hessian) -> result; the tasks it has."""
  n_v, m = s["esd"]

  def density(h):
    nodes, weights = h.density(iter=m, n_v=n_v)
    return np.asarray(nodes), np.asarray(weights)

  names = task_names(s)
  return {
      names[0]: lambda h: h.eigenvalues(maxIter=s["top-1"], tol=0.0,
                                        top_n=1)[0],
      names[1]: lambda h: h.eigenvalues(maxIter=s["top-5"] // 5, tol=0.0,
                                        top_n=5)[0],
      names[2]: lambda h: float(np.mean(h.trace(maxIter=s["trace"],
                                                tol=0.0))),
      names[4]: density,
  }


# --------------------------------------------------------------------------
# One product alone on each side.


def our_products(problem):
  """Units: a whole HVP (forward, backward, tangent), the tangent pass the
  analysis repeats per product, and the GGN's per-product pass."""
  value_fn, params = problem.value_fn, problem.params
  v = jax.tree.map(jnp.ones_like, params)
  grad = jax.grad(value_fn)
  hvp = jax.jit(lambda p, t: jax.jvp(grad, (p,), (t,))[1])
  _, tangent = jax.linearize(grad, params)
  tangent = jax.jit(tangent)
  loss = problems.ggn_loss(problem.name, problem.batch)
  _, jvp = jax.linearize(loss.output_fn, params)
  out = loss.output_fn(params)
  vjp = jax.linear_transpose(jvp, params)
  out_hvp = lambda u: jax.jvp(jax.grad(loss.output_loss), (out,), (u,))[1]
  ggn = jax.jit(lambda t: vjp(out_hvp(jvp(t)))[0])
  return {
      "ours HVP": timing.jax_unit(lambda: hvp(params, v)),
      "ours HVP tangent pass": timing.jax_unit(lambda: tangent(v)),
      "ours GGN product": timing.jax_unit(lambda: ggn(v)),
  }


def peer_products(tp, ops, pyhessian_too):
  """Units: a product of each peer's operator (of PyHessian's graph)."""
  import torch  # pylint: disable=import-outside-toplevel
  units = {}
  if ops:
    v = torch.ones(ops["hessian"].size)
    units["eigenthings HVP"] = lambda: ops["hessian"].matvec(v)
    units["eigenthings GGN product"] = lambda: ops["ggn"].matvec(v)
  if pyhessian_too:
    import pyhessian  # pylint: disable=import-outside-toplevel
    graph = pyhessian.hessian(tp.model, tp.criterion, data=tp.data,
                              cuda=False)
    vs = [torch.ones_like(p) for p in graph.params]
    units["pyhessian HVP"] = lambda: torch.autograd.grad(
        graph.gradsH, graph.params, grad_outputs=vs, retain_graph=True)
  return units


# --------------------------------------------------------------------------
# Measuring a model.


def first_call(fn, clock):
  """`fn()` and its seconds on `clock` (compiles included)."""
  start = clock()
  out = fn()
  jax.block_until_ready(out)
  return out, clock() - start


def measure(problem, args, clock, with_eigenthings, with_pyhessian):
  s = settings(args.quick)
  name, params, batch = problem.name, problem.params, problem.batch
  closures = {"hessian": problem.value_fn,
              "ggn": problems.ggn_loss(name, batch)}
  results = {}  # (task, side) -> {"result", "products", "first_s"...}
  tasks = {}  # timed name -> callable

  for task, (curvature, fn) in ours_tasks(s).items():
    loss = closures[curvature]
    (result, n), eager_s = first_call(
        lambda fn=fn, loss=loss: fn(loss, params), clock)
    results[task, SIDES[0]] = {"result": result, "products": int(n),
                               "first_call_s": eager_s}
    tasks[f"{task} | {SIDES[0]}"] = timing.jax_unit(
        lambda fn=fn, loss=loss: fn(loss, params))

    def in_jit(p, b, fn=fn, curvature=curvature):
      loss = (problems.ggn_loss(name, b) if curvature == "ggn" else
              (lambda q: problems.loss_fn(name, q, b)))
      return fn(loss, p)

    start = clock()
    jitted = jax.jit(in_jit).lower(params, batch).compile()
    compile_s = clock() - start
    (result, n), first_s = first_call(
        lambda jitted=jitted: jitted(params, batch), clock)
    results[task, SIDES[1]] = {"result": result, "products": int(n),
                               "compile_s": compile_s,
                               "first_call_s": first_s}
    tasks[f"{task} | {SIDES[1]}"] = timing.jax_unit(
        lambda jitted=jitted: jitted(params, batch))
    print(f"  {task:14s} ours: first call outside jit {eager_s:6.2f} s, "
          f"compile under jit {compile_s:6.2f} s", flush=True)

  units = our_products(problem)
  if with_eigenthings or with_pyhessian:
    tp = peers.TorchProblem(problem, args.threads)
    counter = {"products": 0}
    ops = peers.eigenthings_operators(tp, counter) if with_eigenthings else {}
  if with_eigenthings:
    for task, (op_name, fn) in eigenthings_tasks(s).items():
      counter["products"] = 0
      result, first_s = first_call(lambda fn=fn, op=ops[op_name]: fn(op),
                                   clock)
      results[task, SIDES[2]] = {"result": result,
                                 "products": counter["products"],
                                 "first_call_s": first_s}
      tasks[f"{task} | {SIDES[2]}"] = lambda fn=fn, op=ops[op_name]: fn(op)
  if with_pyhessian:
    import pyhessian  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    hvps = peers.patch_pyhessian()

    def run(fn):
      torch.manual_seed(0)  # its random start vectors and probes
      return fn(pyhessian.hessian(tp.model, tp.criterion, data=tp.data,
                                  cuda=False))

    for task, fn in pyhessian_tasks(s).items():
      hvps["hvps"] = 0
      result, first_s = first_call(lambda fn=fn: run(fn), clock)
      results[task, SIDES[3]] = {"result": result, "products": hvps["hvps"],
                                 "first_call_s": first_s}
      tasks[f"{task} | {SIDES[3]}"] = lambda fn=fn: run(fn)
  if with_eigenthings or with_pyhessian:
    units.update(peer_products(tp, ops, with_pyhessian))

  by = problems.timed(tasks, args.repeats, clock, units)
  out = {"parameters": problem.dim, "batch": len(batch[1]),
         "exact_hessian_top5": problem.hessian_eigs[::-1][:5].tolist(),
         "exact_ggn_top1": float(problem.ggn_eigs[-1]),
         "exact_trace": float(problem.hessian_eigs.sum()),
         "products": {u: {"seconds": timing.median_s(by[u]),
                          "per_second": 1 / timing.median_s(by[u])}
                      for u in units},
         "tasks": {}}
  for task in task_names(s):
    row = {}
    exact = problem.ggn_eigs if task.startswith("ggn") else (
        problem.hessian_eigs)
    for side in SIDES:
      if (task, side) not in results:
        continue
      r = results[task, side]
      entry = {k: v for k, v in r.items() if k != "result"}
      entry["seconds"] = timing.median_s(by[f"{task} | {side}"])
      entry["error"] = problems.errors(task, r["result"], exact,
                                       problem.sigma)
      for peer in SIDES[2:]:
        if side != peer and (task, peer) in results:
          entry[f"over {peer}"] = timing.ratio(
              by, f"{task} | {side}", f"{task} | {peer}")["median"]
      row[side] = entry
      print(f"  {task:14s} {side:16s} products {entry['products']:4d} "
            f"{1e3 * entry['seconds']:9.1f} ms  error {entry['error']:.1e}"
            + "".join(f"  {k} {v:.2f}x" for k, v in entry.items()
                      if k.startswith("over ")), flush=True)
    out["tasks"][task] = row
  return out


# --------------------------------------------------------------------------
# The report.


def _ms(row, side):
  return f"{1e3 * row[side]['seconds']:.1f}" if side in row else "-"


def _over(row, peer):
  outside, inside = row[SIDES[0]], row[SIDES[1]]
  key = f"over {peer}"
  if key not in outside:
    return "-"
  return f"{outside[key]:.2f} / {inside[key]:.2f}"


def _unit_line(name: str, m: dict) -> str:
  p = m["products"]

  def unit(key):
    if key not in p:
      return "-"
    return f"{1e3 * p[key]['seconds']:.2f} ms ({p[key]['per_second']:.0f}/s)"

  return (f"**{name.upper()}** ({m['parameters']} parameters, batch "
          f"{m['batch']}). One product alone, ms (products per second): "
          f"Hessian: ours {unit('ours HVP tangent pass')} as the analysis "
          f"takes it (a tangent pass), {unit('ours HVP')} from scratch; "
          f"hessian-eigenthings {unit('eigenthings HVP')}; PyHessian "
          f"{unit('pyhessian HVP')}. GGN: ours {unit('ours GGN product')}, "
          f"hessian-eigenthings {unit('eigenthings GGN product')}.")


def model_table(results: dict, name: str) -> str:
  """Time, products, ratios and errors of every task on model `name`."""
  m = results["models"][name]
  header = ["task", "products: ours / eigenthings / PyHessian",
            "ours outside jit, ms", "ours in jit, ms", "eigenthings, ms",
            "PyHessian, ms", "ours ÷ eigenthings (outside / in jit)",
            "ours ÷ PyHessian (outside / in jit)",
            "error: ours / eigenthings / PyHessian"]
  rows = []
  for task, row in m["tasks"].items():
    products = " / ".join(str(row[s]["products"]) if s in row else "-"
                          for s in (SIDES[0], SIDES[2], SIDES[3]))
    errs = " / ".join(f"{row[s]['error']:.1e}" if s in row else "-"
                      for s in (SIDES[0], SIDES[2], SIDES[3]))
    rows.append([task, products] + [_ms(row, s) for s in SIDES]
                + [_over(row, "eigenthings"), _over(row, "pyhessian"), errs])
  return report.table(header, rows)


def mlp_table(results: dict) -> str:
  return model_table(results, "mlp")


def cnn_table(results: dict) -> str:
  return model_table(results, "cnn")


def compile_table(results: dict) -> str:
  """Compile times, apart: our first call outside jit and our compile
  under jit, beside the peers' first calls, for every model."""
  names = list(results["models"])
  header = ["task"]
  for name in names:
    header += [f"{name.upper()}: ours first call outside jit, s",
               f"{name.upper()}: ours compile under jit, s"]
  header += ["eigenthings first call, s (" + " / ".join(
      n.upper() for n in names) + ")", "PyHessian first call, s (" + " / ".join(
          n.upper() for n in names) + ")"]
  tasks = list(results["models"][names[0]]["tasks"])
  rows = []
  for task in tasks:
    cells = [task]
    for name in names:
      row = results["models"][name]["tasks"][task]
      cells += [f"{row[SIDES[0]]['first_call_s']:.2f}",
                f"{row[SIDES[1]]['compile_s']:.2f}"]
    for side in SIDES[2:]:
      cells.append(" / ".join(
          f"{results['models'][n]['tasks'][task][side]['first_call_s']:.2f}"
          if side in results["models"][n]["tasks"][task] else "-"
          for n in names))
    rows.append(cells)
  return report.table(header, rows)


def versions_table(results: dict) -> str:
  """Ours over hessian-eigenthings, outside jit / under jit, and our
  compile times, this version against the earlier run in `previous`."""
  before = results["previous"]
  header = ["model", "task",
            f"÷ eigenthings, {before['version']} (outside / in jit)",
            f"÷ eigenthings, {results['version']} (outside / in jit)",
            f"compile s outside / in jit, {before['version']}",
            f"compile s outside / in jit, {results['version']}"]
  rows = []
  for name, m in results["models"].items():
    for task, row in m["tasks"].items():
      old = before["models"][name]["tasks"][task]
      compile_s = lambda r: (f"{r[SIDES[0]]['first_call_s']:.2f} / "
                             f"{r[SIDES[1]]['compile_s']:.2f}")
      rows.append([name.upper(), task, _over(old, "eigenthings"),
                   _over(row, "eigenthings"), compile_s(old),
                   compile_s(row)])
  return report.table(header, rows)


def values(results: dict) -> dict:
  """Numbers the docs quote: ranges of our time over each peer's, outside
  and under jit, over every task and model, and the range of the changes
  of our ratio to hessian-eigenthings' against the earlier version in
  `previous` (negative: faster relative to the peer)."""
  out = {}
  for peer in ("eigenthings", "pyhessian"):
    for i, where in enumerate(("outside", "in")):
      ratios = [row[SIDES[i]][f"over {peer}"]
                for m in results["models"].values()
                for row in m["tasks"].values()
                if f"over {peer}" in row[SIDES[i]]]
      out[f"{peer}:{where}"] = f"{min(ratios):.2f}–{max(ratios):.2f}"
  span = lambda xs, f="{:.1f}": f"{f.format(min(xs))}–{f.format(max(xs))}"
  rows = [row for m in results["models"].values()
          for row in m["tasks"].values()]
  out["compile:outside"] = span([r[SIDES[0]]["first_call_s"] for r in rows])
  out["compile:in"] = span([r[SIDES[1]]["compile_s"] for r in rows])
  out["peers:first call"] = span(
      [r[s]["first_call_s"] for r in rows for s in SIDES[2:] if s in r],
      "{:.2f}")
  for name, m in results["models"].items():
    for task, row in m["tasks"].items():
      for side in SIDES:
        if side in row:
          out[f"{name} {task} {side} products"] = str(row[side]["products"])
          out[f"{name} {task} {side} ms"] = f"{1e3 * row[side]['seconds']:.1f}"
  if "previous" in results:
    changes, compiles, outside = [], [], []
    for name, m in results["models"].items():
      for task, row in m["tasks"].items():
        old = results["previous"]["models"][name]["tasks"][task]
        for side in SIDES[:2]:
          change = (row[side]["over eigenthings"]
                    / old[side]["over eigenthings"])
          changes.append(change)
          if change > 1.1:
            outside.append(f"{name.upper()} {task} "
                           f"{'under jit' if side == SIDES[1] else 'outside jit'}"
                           f" ({100 * (change - 1):+.0f}%)")
        compiles += [row[SIDES[0]]["first_call_s"]
                     / old[SIDES[0]]["first_call_s"],
                     row[SIDES[1]]["compile_s"] / old[SIDES[1]]["compile_s"]]
    out["ratio_change"] = (f"{100 * (min(changes) - 1):+.0f}% to "
                           f"{100 * (max(changes) - 1):+.0f}%")
    out["ratios within 10%"] = (
        f"{sum(c <= 1.1 for c in changes)} of {len(changes)}")
    out["ratios beyond 10%"] = ", ".join(outside) or "none"
    out["compile_change"] = (f"{100 * (min(compiles) - 1):+.0f}% to "
                             f"{100 * (max(compiles) - 1):+.0f}%")
    out["compile median change"] = (
        f"{100 * (sorted(compiles)[len(compiles) // 2] - 1):+.0f}%")
  out["version"] = results.get("version", "-")
  out["minutes"] = f"{results['wall_s'] / 60:.0f}"
  return out


def markdown(results) -> str:
  parts = []
  for name in results["models"]:
    parts.append(_unit_line(name, results["models"][name]) + "\n")
    parts.append(model_table(results, name) + "\n")
  parts.append("Compile time, apart:\n")
  parts.append(compile_table(results) + "\n")
  if "previous" in results:
    parts.append(versions_table(results) + "\n")
  return "\n".join(parts)


def main(args):
  clock = timing.configure(args.threads, with_torch=True)
  if args.repeats is None:
    args.repeats = 1 if args.quick else 5
  with_eigenthings = peers.available("hessian_eigenthings")
  with_pyhessian = peers.available("pyhessian")
  start = time.perf_counter()
  print(timing.header())
  if not with_eigenthings:
    print("hessian-eigenthings not installed (see the docstring): not "
          "compared")
  if not with_pyhessian:
    print("PyHessian not installed (see the docstring): not compared")
  images, labels = problems.load_data()
  n = 128 if args.quick else 512
  batch = problems.batch_of(images, labels, n)
  results = {"threads": args.threads, "quick": args.quick,
             "jax": jax.__version__, "version": aho.__version__, "batch": n,
             "settings": {k: list(v) if isinstance(v, tuple) else v
                          for k, v in settings(args.quick).items()},
             "repeats": args.repeats, "models": {}}
  for name in args.models.split(","):
    problem = problems.make_problem(name, batch, args.quick, ggn=True)
    print(problem.describe(), flush=True)
    results["models"][name] = measure(problem, args, clock, with_eigenthings,
                                      with_pyhessian)
  results["wall_s"] = time.perf_counter() - start
  if args.previous:
    with open(args.previous, encoding="utf-8") as f:
      previous = json.load(f)
    previous.pop("previous", None)
    previous.setdefault("version", "0.5.2")
    results["previous"] = previous
  text = markdown(results)
  print()
  print(text)
  print(f"wall time {results['wall_s']:.0f} s")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vs_eigenthings.md"), "w") as f:
      f.write(timing.header() + "\n\n" + text)
    report.save_json(os.path.join(args.out, "vs_eigenthings.json"), results)
  if args.json:
    report.save_json(args.json, results)


if __name__ == "__main__":
  main(parse_args())
