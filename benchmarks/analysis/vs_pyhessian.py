"""Hessian analysis: cost and accuracy against the exact Hessian and PyHessian.

For a small MLP and a small CNN on scikit-learn's digits (a few thousand
parameters, so that ``jax.hessian`` gives the exact Hessian), briefly trained
with Adam, this measures in one process:

* for ``aho.hessian_eigenvalues`` (top-1 and top-5, ``tol=1e-4``),
  ``aho.hessian_trace`` (100 Rademacher probes, Hutchinson and Hutch++) and
  ``aho.hessian_spectrum`` (10 probes x 50 steps, and PyHessian's default of
  1 x 100): the Hessian-vector products (HVPs) used, the time in units of one
  HVP and of one gradient of the same loss, and the error against
  ``numpy.linalg.eigvalsh`` of the exact Hessian (for densities: the L1
  distance between the smoothed estimate and the smoothed exact spectrum);
* the same for PyHessian 0.1 (``pip install --no-deps pyhessian==0.1`` on
  ``torch==2.13.0`` CPU), the same architecture and weights copied into
  torch: power iteration (``tol=1e-3``, its default) for the eigenvalues,
  Hutchinson for the trace (``tol=0`` so that all 100 probes run), SLQ for
  the density. PyHessian 0.1 calls ``torch.eig``, which torch 2 removed;
  the benchmark supplies it (``torch.linalg.eigh`` of the symmetric
  tridiagonal matrix, returned in ``torch.eig``'s layout) and counts the
  HVPs by wrapping its ``hessian_vector_product``;
* the top eigenvalue over the whole dataset in batches (``aho.DatasetLoss``,
  PyHessian's ``dataloader=``).

Times (``benchmarks/common/timing.py``): every task is jitted (compile time
reported apart) and warmed up; then, ``--repeats`` rounds, each running every
task of a model once, outside jit and in jit, in a rotating order, beside one
HVP and one gradient of the same loss; the time is the median over rounds and
"in HVPs" / "in gradients" the median of the within-round ratios.
``--threads 1`` (default) pins the process to one core and reads process CPU
time, which other load on a shared machine disturbs little; ``--threads 2``
uses wall time on two threads.

Usage (from the repository root)::

  python -m benchmarks.analysis.vs_pyhessian --quick    # a smoke run, ~1 min
  python -m benchmarks.analysis.vs_pyhessian            # the full run
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import adahessian_optax as aho
from benchmarks.analysis import peers
from benchmarks.analysis import problems
from benchmarks.analysis.problems import errors
from benchmarks.analysis.problems import loss_fn
from benchmarks.common import models
from benchmarks.common import report
from benchmarks.common import timing


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: small batch, few probes, one repeat")
  parser.add_argument("--threads", type=int, choices=(1, 2), default=1)
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--no-torch", action="store_true",
                      help="skip PyHessian even if it is installed")
  parser.add_argument("--json", default=os.path.join("results",
                                                     "bench_analysis.json"))
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


TOL = 1e-4
TASKS = ("top-1", "top-5", "trace", "trace hutch++", "esd 10x50",
         "esd 1x100")


def jax_tasks(quick):
  """Task functions of (value_fn, params), and what each returns."""
  n_trace = 12 if quick else 100
  esd = (2, 10) if quick else (10, 50)

  def top(k):
    def fn(value_fn, p):
      values, _, info = aho.hessian_eigenvalues(value_fn, p, 0, k=k, tol=TOL)
      return values, info.n_steps
    return fn

  def trace(method):
    def fn(value_fn, p):
      t = aho.hessian_trace(value_fn, p, 0, n_samples=n_trace, method=method)
      return t.estimate, n_trace
    return fn

  def spectrum(n_samples, n_steps):
    def fn(value_fn, p):
      s = aho.hessian_spectrum(value_fn, p, 0, n_samples=n_samples,
                               n_steps=n_steps)
      return (s.nodes, s.weights), n_samples * n_steps
    return fn

  return {"top-1": top(1), "top-5": top(5), "trace": trace("hutchinson"),
          "trace hutch++": trace("hutch++"), "esd 10x50": spectrum(*esd),
          "esd 1x100": spectrum(1, 20 if quick else 100)}


def timed(tasks: dict, rounds: int, clock, hvp=None, grad=None) -> dict:
  """Each task's median seconds, and with `hvp` and `grad` (units of one
  product and one gradient) its time in HVPs and in gradients, as medians
  of within-round ratios; name -> dict, ``"hvp"`` and ``"grad"`` too."""
  units = {n: u for n, u in (("hvp", hvp), ("grad", grad)) if u is not None}
  by = problems.timed(tasks, rounds, clock, units)
  out = {}
  for name in by:
    out[name] = {"seconds": timing.median_s(by[name])}
    if units and name in tasks:
      out[name]["in_hvps"] = timing.ratio(by, name, "hvp")["median"]
      out[name]["in_grads"] = timing.ratio(by, name, "grad")["median"]
  return out


def _record(line, task, hvps, times, result, exact_eigs, sigma, label=None):
  out = {"hvps": int(hvps), **times,
         "error": errors(task, result, exact_eigs, sigma)}
  print(f"  {line:11s} {label or task:14s} hvps {int(hvps):5d} "
        f"{out['seconds'] * 1e3:9.1f} ms = {out['in_hvps']:7.1f} HVPs = "
        f"{out['in_grads']:7.1f} grads  error {out['error']:.2e}", flush=True)
  return out


def measure_jax(name, params, batch, exact_eigs, sigma, args, clock):
  """Each task eagerly (Python loops around jitted products) and in jit."""
  value_fn = lambda p: loss_fn(name, p, batch)
  tangent = jax.tree.map(jnp.ones_like, params)
  hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(value_fn), (p,), (v,))[1])
  grad = jax.jit(jax.grad(value_fn))
  units, results, out = {}, {}, {}
  for task, fn in jax_tasks(args.quick).items():
    jitted = jax.jit(lambda p, b, fn=fn: fn(lambda q: loss_fn(name, q, b), p))
    start = time.perf_counter()
    jitted = jitted.lower(params, batch).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    results[f"{task} (eager)"] = fn(value_fn, params)  # compiles its steps
    first_s = time.perf_counter() - start
    results[f"{task} (jit)"] = jitted(params, batch)
    units[f"{task} (eager)"] = timing.jax_unit(
        lambda fn=fn: fn(value_fn, params))
    units[f"{task} (jit)"] = timing.jax_unit(
        lambda jitted=jitted: jitted(params, batch))
    out[f"{task} (jit)"] = {"compile_s": compile_s}
    out[f"{task} (eager)"] = {"first_call_s": first_s}
  times = timed(units, args.repeats, clock,
                hvp=timing.jax_unit(lambda: hvp(params, tangent)),
                grad=timing.jax_unit(lambda: grad(params)))
  for key, (result, hvps) in results.items():
    task, mode = key[:-1].split(" (")
    out[key].update(_record(f"jax {mode}", task, hvps, times[key], result,
                            exact_eigs, sigma))
  out.update(hvp_s=times["hvp"]["seconds"], grad_s=times["grad"]["seconds"])
  return out


def pyhessian_tasks(quick):
  n_trace = 12 if quick else 100
  esd = (2, 10) if quick else (10, 50)

  def top(k):
    return lambda h: h.eigenvalues(top_n=k)[0]

  def density(n_v, steps):
    return lambda h: h.density(iter=steps, n_v=n_v)

  return {"top-1": top(1), "top-5": top(5),
          "trace": lambda h: float(np.mean(h.trace(maxIter=n_trace, tol=0.0))),
          "esd 10x50": density(*esd),
          "esd 1x100": density(1, 20 if quick else 100)}


def measure_pyhessian(name, params, batch, exact_eigs, sigma, args, clock):
  import torch  # pylint: disable=import-outside-toplevel
  import pyhessian  # pylint: disable=import-outside-toplevel
  counter = peers.patch_pyhessian()
  tp = peers.TorchProblem(problems.Problem(name, params, batch, exact_eigs),
                          args.threads)
  model, criterion, (x, y) = tp.model, tp.criterion, tp.data

  def run(task_fn):
    torch.manual_seed(0)  # its random start vectors and probes
    # PyHessian reads the gradient from the params' .grad, which its own
    # backward adds to: without this, a gradient left there (by `graph`
    # below, or `grad`) doubles the Hessian it sees.
    model.zero_grad(set_to_none=True)
    h = pyhessian.hessian(model, criterion, data=(x, y), cuda=False)
    return task_fn(h)

  def counted(task, task_fn):
    """The task's result and the HVPs it took."""
    counter["hvps"] = 0
    result = run(task_fn)
    if task.startswith("esd"):
      result = (np.asarray(result[0]), np.asarray(result[1]))
    return result, counter["hvps"]

  v = [torch.ones_like(p) for p in model.parameters()]
  graph = pyhessian.hessian(model, criterion, data=(x, y), cuda=False)

  def hvp():
    torch.autograd.grad(graph.gradsH, graph.params, grad_outputs=v,
                        retain_graph=True)

  def grad():
    model.zero_grad()
    criterion(model(x), y).backward()

  tasks = pyhessian_tasks(args.quick)
  results = {task: counted(task, fn) for task, fn in tasks.items()}
  # Power iteration to the accuracy Lanczos reaches: the loosest of these
  # tolerances whose answer is within 1e-4 of the exact top eigenvalue.
  tol = next((t for t in (1e-4, 1e-5, 1e-6, 1e-7) if errors(
      "top-1", counted("top-1", _power_iteration(t))[0], exact_eigs,
      sigma) <= TOL), None)
  if tol is not None:
    tasks["top-1 to 1e-4"] = _power_iteration(tol)
    results["top-1 to 1e-4"] = counted("top-1", tasks["top-1 to 1e-4"])
  times = timed({task: lambda f=f: run(f) for task, f in tasks.items()},
                args.repeats, clock, hvp=hvp, grad=grad)
  out = {"hvp_s": times["hvp"]["seconds"], "grad_s": times["grad"]["seconds"]}
  for task, (result, hvps) in results.items():
    out[task] = _record("pyhessian", task.split(" to ")[0], hvps, times[task],
                        result, exact_eigs, sigma,
                        label=f"top-1 tol={tol:g}" if " to " in task else None)
  if tol is not None:
    out["top-1 to 1e-4"]["tol"] = tol
  return out


def _power_iteration(tol):
  return lambda h: h.eigenvalues(maxIter=1000, tol=tol)[0]


def measure_dataset(name, params, images, labels, exact_top, args, clock,
                    torch_too):
  """Top-1 over the whole dataset in batches of 256 (the last one ragged)."""
  size = 256
  batches = [(jnp.asarray(images[i:i + size]), jnp.asarray(labels[i:i + size]))
             for i in range(0, len(labels), size)]
  data = aho.DatasetLoss(lambda p, b: loss_fn(name, p, b), batches)

  def ours():
    values, _, info = aho.hessian_eigenvalues(data, params, 0, tol=TOL)
    return values, info.n_steps

  values, steps = ours()
  found = {"jax": (float(values[0]), int(steps))}
  units = {"jax": timing.jax_unit(ours)}
  if torch_too:
    import torch  # pylint: disable=import-outside-toplevel
    import pyhessian  # pylint: disable=import-outside-toplevel
    counter = peers.patch_pyhessian()
    model = models.small_torch(name, params)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.tensor(images),
                                       torch.tensor(labels).long()),
        batch_size=size)
    criterion = torch.nn.CrossEntropyLoss()

    def theirs():
      torch.manual_seed(0)
      h = pyhessian.hessian(model, criterion, dataloader=loader, cuda=False)
      return h.eigenvalues(top_n=1)[0]

    counter["hvps"] = 0
    value = theirs()[0]
    found["torch"] = (float(value), counter["hvps"])
    units["torch"] = theirs
  times = timed(units, args.repeats, clock)
  out = {}
  for lib, (value, passes) in found.items():
    out[lib] = {"hvps": passes, "seconds": times[lib]["seconds"],
                "error": abs(value - exact_top) / exact_top}
    print(f"  {lib:5s} dataset top-1  hvps {passes:5d} (passes)  "
          f"{out[lib]['seconds']:7.2f} s  error {out[lib]['error']:.2e}",
          flush=True)
  return out


def targets(result):
  """The issue's targets, met by the faster of the two ways of calling."""
  def best(task):
    return min((result["jax"][f"{task} ({mode})"] for mode in ("eager", "jit")),
               key=lambda r: r["seconds"])

  top, theirs = best("top-1"), result["torch"]["top-1"]
  return {
      "top-1 within 1e-4": top["error"] <= 1e-4,
      "top-1 in fewer HVPs than power iteration": top["hvps"] < theirs["hvps"],
      "top-1 in less time than power iteration":
          top["seconds"] < theirs["seconds"],
      "ESD 1x100 in less time than PyHessian":
          best("esd 1x100")["seconds"]
          < result["torch"]["esd 1x100"]["seconds"],
  }


_HEADER = ["task", "HVPs", "time, ms: outside jit / in jit", "in HVPs",
           "in gradients", "relative error", "PyHessian HVPs", "PyHessian ms",
           "PyHessian in HVPs", "PyHessian error"]


def model_table(results, name: str) -> str:
  """One model's line of units and table, as docs/analysis.md shows them."""
  m = results["models"][name]
  jax_, torch_ = m["jax"], m.get("torch", {})
  none = ["-"] * 4
  caption = (
      f"**{name.upper()}** ({m['parameters']} parameters, batch "
      f"{results['batch']}; one HVP: JAX {1e3 * jax_['hvp_s']:.2f} ms, "
      + (f"torch {1e3 * torch_['hvp_s']:.2f} ms; " if torch_ else "")
      + f"one gradient: JAX {1e3 * jax_['grad_s']:.2f} ms"
      + (f", torch {1e3 * torch_['grad_s']:.2f} ms" if torch_ else "")
      + ")")
  rows = []
  for task in TASKS:
    eager, jit = jax_[f"{task} (eager)"], jax_[f"{task} (jit)"]
    best = min(eager, jit, key=lambda r: r["seconds"])
    theirs = torch_.get(task)
    rows.append(
        [task, best["hvps"],
         f"{1e3 * eager['seconds']:.1f} / {1e3 * jit['seconds']:.1f}",
         f"{best['in_hvps']:.1f}", f"{best['in_grads']:.1f}",
         f"{best['error']:.1e}"]
        + ([theirs["hvps"], f"{1e3 * theirs['seconds']:.1f}",
            f"{theirs['in_hvps']:.1f}", f"{theirs['error']:.1e}"]
           if theirs else none))
  if "top-1 to 1e-4" in torch_:
    r = torch_["top-1 to 1e-4"]
    rows.append([f"top-1, power iteration to 1e-4 (tol={r['tol']:g})"]
                + [""] * 5 + [r["hvps"], f"{1e3 * r['seconds']:.1f}",
                              f"{r['in_hvps']:.1f}", f"{r['error']:.1e}"])
  if "dataset" in m:
    d = m["dataset"]
    rows.append(
        ["top-1, whole dataset", f"{d['jax']['hvps']} passes",
         f"{1e3 * d['jax']['seconds']:.0f} / -", "", "",
         f"{d['jax']['error']:.1e}"]
        + ([f"{d['torch']['hvps']} passes",
            f"{1e3 * d['torch']['seconds']:.0f}", "",
            f"{d['torch']['error']:.1e}"] if "torch" in d else none))
  return caption + "\n\n" + report.table(_HEADER, rows)


def markdown(results) -> str:
  """The results as the tables of docs/analysis.md."""
  return "\n\n".join(model_table(results, name)
                      for name in results["models"])


# docs/analysis.md's tables and quoted values, each a function of the
# results file (``--json docs/results/vs_pyhessian.json``).


def mlp_table(data) -> str:
  return model_table(data, "mlp")


def cnn_table(data) -> str:
  return model_table(data, "cnn")


def values(data) -> dict:
  """Numbers the prose quotes, per model (``mlp ...``, ``cnn ...``)."""
  out = {"repeats": str(data["repeats"]), "jax": data["jax"],
         "torch": data.get("torch", "-"),
         "pyhessian": data.get("pyhessian", "-")}
  for name, m in data["models"].items():
    jax_, torch_ = m["jax"], m.get("torch", {})

    def best(task):
      return min(jax_[f"{task} (eager)"], jax_[f"{task} (jit)"],
                 key=lambda r: r["seconds"])

    def ms(seconds):
      return f"{1e3 * seconds:.1f}" if seconds < 1 else f"{seconds:.2f} s"

    out[f"{name} parameters"] = str(m["parameters"])
    for task in TASKS:
      b = best(task)
      out[f"{name} {task} hvps"] = str(b["hvps"])
      out[f"{name} {task} ms"] = ms(b["seconds"])
      out[f"{name} {task} mode"] = ("in jit" if b is jax_[f"{task} (jit)"]
                                    else "outside jit")
      out[f"{name} {task} eager ms"] = ms(jax_[f"{task} (eager)"]["seconds"])
      out[f"{name} {task} jit ms"] = ms(jax_[f"{task} (jit)"]["seconds"])
      out[f"{name} {task} in hvps"] = f"{b['in_hvps']:.1f}"
      out[f"{name} {task} error"] = f"{b['error']:.1e}"
      if task in torch_:
        t = torch_[task]
        out[f"{name} {task} pyhessian hvps"] = str(t["hvps"])
        out[f"{name} {task} pyhessian ms"] = ms(t["seconds"])
        out[f"{name} {task} pyhessian error"] = f"{t['error']:.1e}"
        out[f"{name} {task} speedup"] = f"{t['seconds'] / b['seconds']:.1f}"
        out[f"{name} {task} time ratio"] = (
            f"{b['seconds'] / t['seconds']:.2f}")
    jit_over_eager = [jax_[f"{t} (jit)"]["seconds"]
                      / jax_[f"{t} (eager)"]["seconds"] for t in TASKS]
    out[f"{name} jit over eager"] = (
        f"{min(jit_over_eager):.1f}–{max(jit_over_eager):.1f}")
    out[f"{name} hvp ms"] = f"{1e3 * jax_['hvp_s']:.2f}"
    out[f"{name} grad ms"] = f"{1e3 * jax_['grad_s']:.2f}"
    if torch_:
      out[f"{name} torch hvp ms"] = f"{1e3 * torch_['hvp_s']:.2f}"
      out[f"{name} torch grad ms"] = f"{1e3 * torch_['grad_s']:.2f}"
      if "top-1 to 1e-4" in torch_:
        out[f"{name} power to 1e-4 hvps"] = str(
            torch_["top-1 to 1e-4"]["hvps"])
    out[f"{name} hutch++ gain"] = (
        f"{best('trace')['error'] / best('trace hutch++')['error']:.0f}")
    if "dataset" in m:
      d = m["dataset"]
      out[f"{name} dataset passes"] = str(d["jax"]["hvps"])
      if "torch" in d:
        out[f"{name} dataset pyhessian passes"] = str(d["torch"]["hvps"])
        out[f"{name} dataset time ratio"] = (
            f"{d['jax']['seconds'] / d['torch']['seconds']:.2f}")
    for target, met in m.get("targets", {}).items():
      out[f"{name} target {target}"] = "met" if met else "not met"
  return out


def main(args):
  clock = timing.configure(args.threads, with_torch=True)
  if args.repeats is None:
    args.repeats = 1 if args.quick else 7
  torch_too = not args.no_torch and peers.available("pyhessian")
  print(timing.header())
  if not torch_too:
    print("PyHessian not installed (see docs/analysis.md); JAX only")
  images, labels = problems.load_data()
  n = 128 if args.quick else 512
  batch = problems.batch_of(images, labels, n)
  results = {"script": "python -m benchmarks.analysis.vs_pyhessian"
                       + "".join(f" {a}" for a in args.argv),
             "threads": args.threads, "quick": args.quick,
             "repeats": args.repeats, "jax": jax.__version__,
             "adahessian_optax": aho.__version__, "header": timing.header(),
             "batch": n, "models": {}}
  if torch_too:
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    results.update(torch=torch.__version__,
                   pyhessian=importlib.metadata.version("pyhessian"))
  for name in args.models.split(","):
    problem = problems.make_problem(name, batch, args.quick)
    params, exact_eigs, sigma = (problem.params, problem.hessian_eigs,
                                 problem.sigma)
    print(problem.describe(), flush=True)
    result = {"parameters": problem.dim,
              "exact_top5": exact_eigs[::-1][:5].tolist(),
              "exact_trace": float(exact_eigs.sum()),
              "jax": measure_jax(name, params, batch, exact_eigs, sigma, args,
                                 clock)}
    if torch_too:
      result["torch"] = measure_pyhessian(name, params, batch, exact_eigs,
                                          sigma, args, clock)
      result["targets"] = targets(result)
      for target, met in result["targets"].items():
        print(f"  target {target}: {'met' if met else 'NOT met'}")
    if not args.quick:
      data_top = np.linalg.eigvalsh(problems.exact_hessian(
          lambda p, name=name: loss_fn(name, p, (jnp.asarray(images),
                                                 jnp.asarray(labels))),
          params))[-1]
      result["dataset"] = measure_dataset(name, params, images, labels,
                                          data_top, args, clock, torch_too)
    results["models"][name] = result
  print()
  print(markdown(results))
  report.save_json(args.json, results)


if __name__ == "__main__":
  main(parse_args())
