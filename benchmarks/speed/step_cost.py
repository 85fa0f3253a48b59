"""AdaHessian's cost per step against Adam and the Hessian-vector-product floor.

For an MLP (0.93M parameters), a small CNN and a small Transformer (Flax),
in one process, as medians of within-round ratios
(``benchmarks/common/timing.py``):

* the floor F = time(jvp(grad)) / time(grad): what a Hessian-vector product
  costs next to the gradient it comes with;
* the step, relative to ``optax.adam``'s, refreshing every k = 1..5 steps:
  "fused" and "plain" with the refresh decided on the host (two programs;
  target: at most 1.05 (1 + (F - 1)/k)), and "auto", the plain call with
  ``update_interval=k`` in one program (target: at most 1.05 times the plain
  step at k = 1, and 1.05 (1 + (F - 1)/k) where ``lax.cond`` runs the
  skipped branch at full speed);
* a Hessian on a fraction f of the batch (``aho.sub_batch_value_fn``; target:
  at most 1.05 (1 + (F - 1) f / k)), ``n_samples`` = 2, 4, 8, and the
  memory option ``chunks=2``.

Usage (from the repository root)::

  python -m benchmarks.speed.step_cost --quick          # smoke run
  python -m benchmarks.speed.step_cost                  # 2 threads, wall
  python -m benchmarks.speed.step_cost --threads 1      # 1 core, CPU time
"""

import argparse
import os

# These import jax but run nothing: configure() pins threads before the first
# computation.
import jax
import numpy as np
import optax.tree

from benchmarks.common import models as _models
from benchmarks.common import report as _report
from benchmarks.common import timing as _timing
from benchmarks.speed import train_steps as _steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PAPER_COST = {1: 2.27, 5: 1.25}  # ResNet32 on CIFAR-10 (GPU), x Adam


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: tiny batches, few variants and rounds")
  parser.add_argument("--plan", choices=("full", "gpu"), default="full",
                      help="gpu: k = 1..5, one fraction, s <= 4 (fewer "
                           "programs to compile, for benchmarks/speed/gpu.sh)")
  parser.add_argument("--threads", type=int, choices=(0, 1, 2), default=2,
                      help="1: one core, CPU time; 2: wall time (default); "
                           "0: wall time, no pinning (GPU)")
  parser.add_argument("--models", default="mlp,cnn,transformer")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--block", type=float, default=None,
                      help="seconds per timed block")
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--images", default=None,
                      help="folder for the plots (default: docs/images for a "
                           "full CPU run, none otherwise); 'none' to skip")
  parser.add_argument("--tag", default=None,
                      help="plot file suffix (default: '', '_1thread' for 1)")
  return parser.parse_args(argv)


def plan(quick, name="full"):
  if quick:
    return {"ks": [1, 2], "fractions": [0.5], "fraction_ks": [1],
            "samples": [1, 2]}
  if name == "gpu":
    return {"ks": [1, 2, 3, 4, 5], "fractions": [0.5], "fraction_ks": [1],
            "samples": [1, 2, 4]}
  return {"ks": [1, 2, 3, 4, 5], "fractions": [0.5, 0.25],
          "fraction_ks": [1, 2], "samples": [1, 2, 4, 8]}


def build_variants(problem, p):
  """The timed variants of one model, by name."""
  params, batch = problem.params, problem.batch
  grad_fn = jax.jit(jax.grad(problem.loss))
  hvp_fn = jax.jit(lambda p_, t, b: jax.jvp(
      jax.grad(lambda q: problem.loss(q, b)), (p_,), (t,)))
  tangent = optax.tree.random_like(jax.random.key(1), params,
                                   jax.random.normal)
  variants, strategies = [], {}

  def add(name, tx, style, k=1, **kwargs):
    step = _steps.train_step(problem, tx, style, **kwargs)
    variants.append(_timing.Variant(name, _timing.stepping(
        step, params, tx.init(params), batch,
        _steps.refresh_pattern(style, k)), steps=k))
    return step

  variants += [
      _timing.Variant("grad", _timing.jax_unit(
          lambda: grad_fn(params, batch))),
      _timing.Variant("hvp", _timing.jax_unit(
          lambda: hvp_fn(params, tangent, batch))),
  ]
  add("adam", _steps.adam(), "adam")
  for k in p["ks"]:
    add(f"fused_k{k}", _steps.adahessian(), "fused", k)
    add(f"plain_k{k}", _steps.adahessian(), "plain", k)
    tx = _steps.adahessian(update_interval=k)
    step = add(f"auto_k{k}", tx, "auto", k)
    text = str(jax.make_jaxpr(step)(params, tx.init(params), batch))
    strategies[k] = "cond" if " cond[" in text else "static"
  for f in p["fractions"]:
    for k in p["fraction_ks"]:
      add(f"fused_f{f}_k{k}", _steps.adahessian(), "fused", k, fraction=f)
    add(f"plain_f{f}_k1", _steps.adahessian(), "plain", 1, fraction=f)
  for s in p["samples"][1:]:
    add(f"samples_{s}", _steps.adahessian(n_samples=s), "fused")
  add("chunks_2", _steps.adahessian(), "fused", chunks=2)
  return variants, strategies


def measure(problem, p, rounds, block, clock):
  variants, strategies = build_variants(problem, p)
  by = _timing.measure(variants, rounds, block, clock)
  r = lambda a, b: _timing.ratio(by, a, b)
  floor = r("hvp", "grad")

  def over(name, k, f=1.0):
    """(step / Adam) / (1 + (F - 1) f / k), F from the same round."""
    return _timing.ratio_of(
        by, [name, "adam", "hvp", "grad"],
        lambda s, a, h, g: (s / a) / (1 + (h / g - 1) * f / k))

  out = {"floor": floor, "strategies": strategies,
         "ms": {v.name: _timing.median_ms(v) for v in variants}}
  for style in _steps.STYLES:
    out[style] = {k: {"x_adam": r(f"{style}_k{k}", "adam"),
                      "over_floor": over(f"{style}_k{k}", k)}
                  for k in p["ks"]}
  for k in p["ks"]:
    out["auto"][k]["over_plain_k1"] = r(f"auto_k{k}", "plain_k1")
  out["fractions"] = {}
  for f in p["fractions"]:
    cells = {f"fused_k{k}": {"x_adam": r(f"fused_f{f}_k{k}", "adam"),
                             "over_floor": over(f"fused_f{f}_k{k}", k, f)}
             for k in p["fraction_ks"]}
    cells["plain_k1"] = {"x_adam": r(f"plain_f{f}_k1", "adam"),
                         "over_floor": over(f"plain_f{f}_k1", 1, f)}
    out["fractions"][f] = cells
  out["samples"] = {s: r(f"samples_{s}", "fused_k1")
                    for s in p["samples"][1:]}
  out["chunks_2"] = r("chunks_2", "fused_k1")
  return out


def tables(results, p, clock_name):
  fmt, mark, table = _report.fmt, _report.mark, _report.table
  tol = _report.TOLERANCE
  parts = [f"### Cost per step x Adam ({clock_name}); in brackets over the "
           "floor's 1 + (F − 1)/k (target ≤ 1.05)"]
  rows = []
  for name, res in results.items():
    for style in _steps.STYLES:
      row = [name, style, fmt(res["floor"]["median"])]
      for k in p["ks"]:
        c = res[style][k]
        row.append(f"{fmt(c['x_adam']['median'])} "
                   f"({mark(c['over_floor']['median'], tol)})")
      rows.append(row)
  rows.append(["paper (ResNet32, GPU)", "", "—"]
              + [fmt(PAPER_COST.get(k)) for k in p["ks"]])
  parts.append(table(["model", "step", "floor F"]
                     + [f"k={k}" for k in p["ks"]], rows))
  parts.append("\n### `update_interval=k` in one program (auto): strategy, "
               "and cost over the plain step at k=1 (target ≤ 1.05)")
  rows = [[name] + [f"{res['strategies'][k]}: "
                    f"{mark(res['auto'][k]['over_plain_k1']['median'], tol)}"
                    for k in p["ks"]] for name, res in results.items()]
  parts.append(table(["model"] + [f"k={k}" for k in p["ks"]], rows))
  parts.append("\n### Hessian on a fraction f of the batch: cost x Adam, in "
               "brackets over 1 + (F − 1) f/k (target ≤ 1.05)")
  rows = []
  for name, res in results.items():
    for f, cells in res["fractions"].items():
      rows.append([name, f"{f:g}"] + [
          f"{fmt(c['x_adam']['median'])} ({mark(c['over_floor']['median'], tol)})"
          for c in cells.values()])
  first = next(iter(results.values()))["fractions"]
  cols = list(next(iter(first.values())))
  parts.append(table(["model", "f"] + [c.replace("_", " ") for c in cols],
                     rows))
  parts.append("\n### `n_samples` and `chunks=2`: step time over the fused "
               "k=1 step")
  rows = [[name] + [fmt(res["samples"][s]["median"]) for s in p["samples"][1:]]
          + [fmt(res["chunks_2"]["median"])] for name, res in results.items()]
  parts.append(table(["model"] + [f"s={s}" for s in p["samples"][1:]]
                     + ["chunks=2"], rows))
  parts.append("\n### Milliseconds per step (median)")
  cols = ["grad", "hvp", "adam", "fused_k1", "plain_k1", "auto_k2"]
  parts.append(table(["model"] + cols, [
      [name] + [fmt(res["ms"][c], 1) for c in cols]
      for name, res in results.items()]))
  return "\n".join(parts)


def plot(results, p, image_dir, tag, clock_name):
  plt, save = _report.figure_saver(image_dir, tag)
  names = list(results)
  ks = np.asarray(p["ks"], float)
  fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names), 3.8),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    res = results[name]
    f = res["floor"]["median"]
    floor = 1 + (f - 1) / ks
    ax.fill_between(ks, floor, 1.05 * floor, color="0.85",
                    label="floor 1+(F−1)/k … +5%")
    ax.plot(ks, floor, "k--", lw=1)
    for style, marker in (("fused", "o-"), ("plain", "^:"), ("auto", "x-.")):
      ax.plot(ks, [res[style][k]["x_adam"]["median"] for k in p["ks"]],
              marker, label=f"{style}" + (" (one program)" if style == "auto"
                                          else " (host decides)"))
    ax.plot(sorted(PAPER_COST), [PAPER_COST[k] for k in sorted(PAPER_COST)],
            "s", color="tab:red", label="paper (ResNet32, GPU)")
    ax.set(title=f"{name}: F = {f:.2f}", xlabel="update_interval k",
           ylabel="time per step / Adam's", xticks=p["ks"])
    ax.set_ylim(bottom=0.8)
    ax.legend(fontsize=7)
  fig.suptitle(f"AdaHessian cost per step x Adam ({clock_name})", fontsize=10)
  save(fig, "bench_interval")

  fig, ax = plt.subplots(figsize=(5, 3.6))
  samples = p["samples"]
  for name in names:
    ax.plot(samples, [1.0] + [results[name]["samples"][s]["median"]
                              for s in samples[1:]], "o-", label=name)
  ax.plot(samples, samples, "k:", label="linear (s separate passes)")
  ax.set(xscale="log", yscale="log", xlabel="n_samples s",
         ylabel="step time / (s=1 step time)")
  ax.set_xticks(samples, [str(s) for s in samples])
  ax.set_title(f"One primal pass, one tangent pass per probe ({clock_name})",
               fontsize=9)
  ax.legend(fontsize=8)
  save(fig, "bench_samples")


def targets(results, p):
  out = []
  for name, res in results.items():
    for style in ("fused", "plain"):
      for k in p["ks"]:
        rel = res[style][k]["over_floor"]["median"]
        out.append((f"{name} [{style}]: k={k}: {rel:.3f} x (1+(F-1)/k)",
                    rel <= _report.TOLERANCE))
    for k in p["ks"]:
      rel = res["auto"][k]["over_plain_k1"]["median"]
      out.append((f"{name} [auto, {res['strategies'][k]}]: k={k}: {rel:.3f} x "
                  "the plain k=1 step", rel <= _report.TOLERANCE))
      rel = res["auto"][k]["over_floor"]["median"]
      out.append((f"{name} [auto, {res['strategies'][k]}]: k={k}: {rel:.3f} "
                  "x (1+(F-1)/k)", rel <= _report.TOLERANCE))
    for f, cells in res["fractions"].items():
      for col, c in cells.items():
        rel = c["over_floor"]["median"]
        out.append((f"{name} [f={f:g}, {col}]: {rel:.3f} x (1+(F-1)f/k)",
                    rel <= _report.TOLERANCE))
  return out


# ---------------------------------------------------------------------------
# The docs' tables, each a function of a results file (``--json``), as
# written to docs/results/step_cost_<clock>.json.

_NAMES = {"mlp": "MLP, 0.93M params", "cnn": "CNN",
          "transformer": "Transformer"}


def _clock(data) -> str:
  return "1 core" if data["threads"] == 1 else "2 threads"


def _ks(data) -> list:
  return data["plan"]["ks"]


def _med(cell) -> float:
  return cell["median"]


def readme_cost_table(data) -> str:
  """The README's: the fused step's cost x Adam's and the floor F."""
  fmt = _report.fmt
  rows = [[_NAMES.get(name, name), fmt(_med(res["floor"]))]
          + [fmt(_med(res["fused"][str(k)]["x_adam"])) for k in _ks(data)]
          for name, res in data["results"].items()]
  rows.append(["paper (ResNet32, GPU)", ""]
              + [fmt(PAPER_COST[k]) if k in PAPER_COST else ""
                 for k in _ks(data)])
  return _report.table([f"cost per step x Adam ({_clock(data)})", "F"]
                       + [f"k={k}" for k in _ks(data)], rows)


def cost_table(data) -> str:
  """Each step style's cost x Adam, in brackets over the floor's
  1 + (F - 1)/k (✗ above 1.05)."""
  fmt, mark, tol = _report.fmt, _report.mark, _report.TOLERANCE
  rows = []
  for name, res in data["results"].items():
    for style in _steps.STYLES:
      rows.append([name, style, fmt(_med(res["floor"]))] + [
          f"{fmt(_med(res[style][str(k)]['x_adam']))} "
          f"({mark(_med(res[style][str(k)]['over_floor']), tol)})"
          for k in _ks(data)])
  rows.append(["paper (ResNet32, GPU)", "", "—"]
              + [fmt(PAPER_COST.get(k)) if k in PAPER_COST else "—"
                 for k in _ks(data)])
  return _report.table(["model", "step", "floor F"]
                       + [f"k={k}" for k in _ks(data)], rows)


def auto_table(data) -> str:
  """The auto step's strategy and its cost over the plain step at k = 1."""
  mark, tol = _report.mark, _report.TOLERANCE
  return _report.table(
      [f"model ({_clock(data)})"] + [f"k={k}" for k in _ks(data)],
      [[name] + [f"{res['strategies'][str(k)]}: "
                 f"{mark(_med(res['auto'][str(k)]['over_plain_k1']), tol)}"
                 for k in _ks(data)]
       for name, res in data["results"].items()])


def fraction_table(data) -> str:
  """A Hessian on a fraction f of the batch: cost x Adam, in brackets over
  1 + (F - 1) f / k."""
  fmt, mark, tol = _report.fmt, _report.mark, _report.TOLERANCE
  rows, cols = [], None
  for name, res in data["results"].items():
    for f, cells in res["fractions"].items():
      cols = list(cells)
      rows.append([name, f"{float(f):g}"] + [
          f"{fmt(_med(c['x_adam']))} ({mark(_med(c['over_floor']), tol)})"
          for c in cells.values()])
  return _report.table([f"model ({_clock(data)})", "f"]
                       + [c.replace("_", " ").replace("k", "k=")
                          for c in cols], rows)


def samples_table(data) -> str:
  """`n_samples` and `chunks=2`: step time over the fused step at k = 1."""
  fmt = _report.fmt
  samples = data["plan"]["samples"][1:]
  return _report.table(
      [f"model ({_clock(data)})"] + [f"s={s}" for s in samples]
      + ["chunks=2"],
      [[name] + [fmt(_med(res["samples"][str(s)])) for s in samples]
       + [fmt(_med(res["chunks_2"]))]
       for name, res in data["results"].items()])


def ms_table(data) -> str:
  """Milliseconds per step (medians)."""
  cols = {"grad": "grad", "hvp": "HVP", "adam": "Adam step",
          "fused_k1": "fused, k=1", "plain_k1": "plain, k=1",
          "auto_k2": "auto, k=2"}
  return _report.table(
      [f"model ({_clock(data)})"] + list(cols.values()),
      [[name] + [_report.fmt(res["ms"][c], 1) for c in cols]
       for name, res in data["results"].items()])


def targets_table(data) -> str:
  """Each timing target of the docs, met or missed, with the range of the
  measured ratios (1.05 is the tolerance)."""
  tol = _report.TOLERANCE
  res = data["results"]
  def verdict(xs):
    xs = list(xs)
    ok = "**met**" if max(xs) <= tol else "**missed**"
    return f"{ok}: {min(xs):.2f}–{max(xs):.2f}"
  def per_model(fn):
    return "; ".join(f"{name} {verdict(fn(r))}" for name, r in res.items())
  ks = [str(k) for k in _ks(data)]
  rows = [
      ["fused step ≤ 1.05 (1+(F−1)/k) × Adam, k = 1…5",
       per_model(lambda r: (_med(r["fused"][k]["over_floor"]) for k in ks))],
      ["plain step, the same",
       per_model(lambda r: (_med(r["plain"][k]["over_floor"]) for k in ks))],
      ["auto step ≤ 1.05 × the plain step at k = 1",
       per_model(lambda r: (_med(r["auto"][k]["over_plain_k1"])
                            for k in ks))],
      ["auto step ≤ 1.05 (1+(F−1)/k) where `lax.cond` skips the product",
       per_model(lambda r: (_med(r["auto"][k]["over_floor"]) for k in ks
                            if r["strategies"][k] == "cond"))],
      ["Hessian on a sub-batch ≤ 1.05 (1+(F−1)f/k)",
       per_model(lambda r: (_med(c["over_floor"])
                            for cells in r["fractions"].values()
                            for c in cells.values()))],
  ]
  s8 = data["plan"]["samples"][-1]
  rows.append([f"`n_samples` sub-linear: s = {s8} under {s8}× the s = 1 step",
               "; ".join(f"{name} {_med(r['samples'][str(s8)]):.2f}"
                         for name, r in res.items())])
  return _report.table([f"target ({_clock(data)})", "result"], rows)


def values(data) -> dict:
  """Ranges quoted in the prose: ``fused_over_floor`` (the fused step over
  the floor, every model and k), ``auto_over_plain`` (the auto step's cost
  over the plain k = 1 step, where it takes ``lax.cond``),
  ``samples_<s>`` (the s-probe step over the one-probe step)."""
  res = data["results"].values()
  def span(xs, nd=2):
    xs = list(xs)
    return f"{min(xs):.{nd}f}–{max(xs):.{nd}f}"
  out = {"fused_over_floor": span(
      _med(r["fused"][str(k)]["over_floor"]) for r in res
      for k in _ks(data))}
  cond = [_med(r["auto"][str(k)]["over_plain_k1"]) for r in res
          for k in _ks(data) if r["strategies"][str(k)] == "cond"]
  if cond:
    out["auto_over_plain"] = span(cond)
  for s in data["plan"]["samples"][1:]:
    out[f"samples_{s}"] = span((_med(r["samples"][str(s)]) for r in res), 1)
  out["chunks_2"] = span(_med(r["chunks_2"]) for r in res)
  out["fused_k1_range"] = span((_med(r["fused"]["1"]["x_adam"]) for r in res),
                               1)
  for name, r in data["results"].items():
    out[f"plain_over_floor:{name}"] = span(
        _med(r["plain"][str(k)]["over_floor"]) for k in _ks(data))
    out[f"auto_over_floor:{name}"] = span(
        _med(r["auto"][str(k)]["over_floor"]) for k in _ks(data))
    out[f"fraction_over_floor:{name}"] = span(
        _med(c["over_floor"]) for cells in r["fractions"].values()
        for c in cells.values())
  out["F_range"] = span((_med(r["floor"]) for r in res), 1)
  for name, r in data["results"].items():
    for k in _ks(data):
      out[f"auto_over_plain_k{k}:{name}"] = (
          f"{_med(r['auto'][str(k)]['over_plain_k1']):.2f}")
    out[f"F:{name}"] = f"{_med(r['floor']):.2f}"
    for k in _ks(data):
      out[f"fused_k{k}:{name}"] = f"{_med(r['fused'][str(k)]['x_adam']):.2f}"
  return out


def main(args):
  clock = _timing.configure(args.threads)
  p = plan(args.quick, args.plan)
  rounds = args.rounds or (3 if args.quick else 20)
  block = args.block or (0.02 if args.quick else 0.1)
  clock_name = ("process CPU time, 1 core" if args.threads == 1 else
                "wall time, 2 threads" if args.threads == 2 else "wall time")
  print(_timing.header())
  print(f"clock: {clock_name}; rounds={rounds}, block={block}s; {p}")
  results = {}
  for problem in _models.make_problems(args.models.split(","), args.quick):
    print(f"\n[{problem.name}] {_models.n_params(problem.params):,} "
          f"parameters, input {problem.inputs.shape}", flush=True)
    results[problem.name] = measure(problem, p, rounds, block, clock)
    res = results[problem.name]
    print(f"  F = {res['floor']['median']:.2f}; fused k=1 "
          f"{res['fused'][1]['x_adam']['median']:.2f}x Adam", flush=True)
    _report.save_json(args.json, {"results": results, "partial": True})
  print()
  print(tables(results, p, clock_name))
  print("\n### Targets\n")
  print(_report.checklist(targets(results, p)))
  on_cpu = jax.default_backend() == "cpu"
  images = args.images or (
      os.path.join(ROOT, "docs", "images") if on_cpu and not args.quick
      else "none")
  if images != "none":
    tag = args.tag if args.tag is not None else (
        "_1thread" if args.threads == 1 else "")
    plot(results, p, images, tag, clock_name)
  _report.save_json(args.json, {"results": results, "plan": p, "rounds": rounds,
                        "threads": args.threads, "quick": args.quick,
                        "backend": jax.default_backend()})
  return results


if __name__ == "__main__":
  main(parse_args())
