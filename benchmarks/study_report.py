"""Tables and plots of the study from its cached summaries (study.py)."""

import json
import math
import os
import re
import shutil
import statistics

import numpy as np

MULTIPLIERS = ("0.5", "1.0", "2.0", "3.0", "5.0", "10.0")
PARTS = ("small", "cnn", "lm")
# Rows of the options table: by kind, then by number.
_KINDS = ("k=", "probes", "Gaussian", "block", "sub-batch")
DOCS_IMAGES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "docs", "images")


def _load(out: str) -> tuple[dict, dict, tuple]:
  """`(tasks by name, costs, (minutes, runs))` of the parts under `out`."""
  tasks, minutes, runs = {}, 0.0, 0
  for part in PARTS:
    path = os.path.join(out, f"summary_{part}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      data = json.load(f)
    tasks.update(data["tasks"])
    minutes += data["minutes"]
    runs += data["runs"]
  costs = {}
  if os.path.exists(os.path.join(out, "summary_cost.json")):
    with open(os.path.join(out, "summary_cost.json")) as f:
      costs = json.load(f)
  return tasks, costs, (minutes, runs)


def _digits(task: dict) -> int:
  return 3 if task["metric"] == "test loss" else 2


def cell(runs, digits: int) -> str:
  """`mean ± std` over seeds, with the diverged runs counted."""
  values = [float(r["metric"]) for r in runs]
  finite = [v for v in values if math.isfinite(v)]
  bad = sum(r["diverged"] for r in runs)
  if bad == len(runs) or not finite:
    return f"diverged ({bad}/{len(runs)})"
  spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
  text = f"{statistics.mean(finite):.{digits}f} ± {spread:.{digits}f}"
  return text + (f" ({bad}/{len(runs)} div.)" if bad else "")


def _row(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def _header(cells) -> list[str]:
  return [_row(cells), _row(["---"] * len(cells))]


def _labels(tasks: dict, field: str = "optimizers") -> list[str]:
  """The optimizers (or ablations) of any task, in order of appearance."""
  labels = []
  for t in tasks.values():
    labels += [a for a in t[field] if a not in labels]
  return labels


def _option_order(label: str) -> tuple:
  kind = next((i for i, k in enumerate(_KINDS) if k in label), len(_KINDS))
  numbers = re.findall(r"[\d.]+", label)
  return kind, float(numbers[0]) if numbers else 0.0, label


def headline(tasks: dict) -> str:
  """Test metric at the tuned rate, mean ± std over seeds; tuned rates."""
  names = list(tasks)
  lines = _header(["optimizer"] + [f"{n} ({tasks[n]['metric']})"
                                   for n in names])
  def each(label, fn):
    return [fn(tasks[n], tasks[n]["optimizers"][label])
            if label in tasks[n]["optimizers"] else "-" for n in names]
  for label in _labels(tasks):
    lines.append(_row([label] + each(label, lambda t, r: cell(
        r["sensitivity"]["1.0"], _digits(t)))))
  lines += ["", *(_header(["tuned peak lr"] + names))]
  for label in _labels(tasks):
    lines.append(_row([label] + each(label, lambda t, r: _lr(r["tuned"]))))
  return "\n".join(lines)


def _lr(tuned: dict) -> str:
  return f"{tuned['lr']:g}" + (" (edge)" if tuned["edge"] else "")


def robustness(name: str, task: dict) -> str:
  """The paper's robustness table: rows optimizers, columns multipliers."""
  lines = _header([f"{name}: {task['metric']}"]
                  + [f"{float(m):g}x" for m in MULTIPLIERS])
  for label, result in task["optimizers"].items():
    lines.append(_row([label] + [cell(result["sensitivity"][m],
                                      _digits(task)) for m in MULTIPLIERS]))
  return "\n".join(lines)


def divergences(tasks: dict) -> str:
  """Diverged runs over all tasks at each multiplier, per optimizer."""
  lines = _header(["diverged runs, all tasks"]
                  + [f"{float(m):g}x" for m in MULTIPLIERS])
  for label in _labels(tasks):
    counts = []
    for m in MULTIPLIERS:
      runs = [r for t in tasks.values() if label in t["optimizers"]
              for r in t["optimizers"][label]["sensitivity"][m]]
      counts.append(f"{sum(r['diverged'] for r in runs)}/{len(runs)}")
    lines.append(_row([label] + counts))
  return "\n".join(lines)


def ablation_table(tasks: dict) -> str:
  """AdaHessian's options at its tuned rate, beside the default."""
  names = list(tasks)
  lines = _header(["AdaHessian at its tuned lr"] + names)
  lines.append(_row(["default (k=1, 1 Rademacher probe)"] + [
      cell(tasks[n]["optimizers"]["AdaHessian"]["sensitivity"]["1.0"],
           _digits(tasks[n])) for n in names]))
  for label in sorted(_labels(tasks, "ablations"), key=_option_order):
    lines.append(_row([label] + [
        cell(tasks[n]["ablations"][label], _digits(tasks[n]))
        if label in tasks[n]["ablations"] else "-" for n in names]))
  return "\n".join(lines)


def cost_table(costs: dict) -> str:
  """Step cost relative to Adam: k = 1..5 measured and 1 + (F - 1)/k."""
  ks = range(1, 6)
  lines = _header(["cost per step x Adam", "Adam ms"]
                  + [f"k={k}" for k in ks] + ["sub-batch 1/2",
                                              "sub-batch 1/4"])
  for name, c in costs.items():
    r = c["ratio"]
    lines.append(_row(
        [name, f"{c['adam_ms']:.2f}"]
        + [f"{r[f'k={k}']:.2f} ({1 + (c['F'] - 1) / k:.2f})" for k in ks]
        + [f"{r[s]:.2f}" if s in r else "-"
           for s in ("sub-batch 0.5", "sub-batch 0.25")]))
  return "\n".join(lines)


def tuning_grids(tasks: dict) -> str:
  """Every grid point's validation score (mean log validation loss)."""
  lines = []
  for name, task in tasks.items():
    lines.append(f"- **{name}**:")
    for label, result in task["optimizers"].items():
      grid = ", ".join(f"{lr}: {float(s):.3f}" if math.isfinite(float(s))
                       else f"{lr}: div." for lr, s in
                       result["tuned"]["grid"].items())
      lines.append(f"  {label} ({grid})")
  return "\n".join(lines)


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _panels(plt, n):
  """`n` axes, in two rows when there are more than three."""
  rows = 1 if n <= 3 else 2
  cols = -(-n // rows)
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows),
                           squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  return fig, axes.flat[:n]


def _save(fig, path, legend: bool = True) -> str:
  """Saves `fig`, with one legend of every line, in a spare panel if any."""
  if legend:
    _legend(fig)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  fig.clf()
  return path


def _legend(fig) -> None:
  handles = {}
  for ax in fig.axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  spare = [ax for ax in fig.axes if not ax.axison]
  if spare:
    spare[0].legend(handles.values(), handles.keys(), loc="center")
  else:
    fig.axes[-1].legend(handles.values(), handles.keys(), fontsize=7)


def plot_sensitivity(tasks: dict, path: str) -> str:
  """The final test metric against the multiple of the tuned rate."""
  plt = _plt()
  fig, axes = _panels(plt, len(tasks))
  xs = [float(m) for m in MULTIPLIERS]
  for ax, (name, task) in zip(axes, tasks.items()):
    for label, result in task["optimizers"].items():
      means, stds = [], []
      for m in MULTIPLIERS:
        values = [float(r["metric"]) for r in result["sensitivity"][m]
                  if not r["diverged"] and math.isfinite(float(r["metric"]))]
        means.append(np.mean(values) if values else np.nan)
        stds.append(np.std(values) if values else np.nan)
      style = "--" if label.startswith("AdaHessian ") else "-"
      ax.errorbar(xs, means, yerr=stds, marker="o", ms=3, capsize=2,
                  ls=style, lw=2.5 if label == "AdaHessian" else 1,
                  label=label)
    ax.set(xscale="log", title=name, xlabel="lr / tuned lr",
           ylabel=task["metric"] + " (diverged runs left out)")
    ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_curves(tasks: dict, path: str) -> str:
  """Held-out loss over training at the tuned rate, bands over seeds."""
  plt = _plt()
  fig, axes = _panels(plt, len(tasks))
  for ax, (name, task) in zip(axes, tasks.items()):
    for label, result in task["optimizers"].items():
      if label.startswith("AdaHessian "):
        continue
      # Bands of the log: the losses span decades across seeds.
      logs = np.log10(np.array(
          [r["eval_loss"] for r in result["sensitivity"]["1.0"]], dtype=float))
      mean, std = logs.mean(0), logs.std(0)
      x = np.arange(1, len(mean) + 1) / len(mean)
      line, = ax.plot(x, 10 ** mean, lw=2.5 if label == "AdaHessian" else 1,
                      label=label)
      ax.fill_between(x, 10 ** (mean - std), 10 ** (mean + std),
                      color=line.get_color(), alpha=0.15)
    ax.set(yscale="log", title=name, xlabel="fraction of training",
           ylabel="held-out loss (test split; ± std of its log)")
    ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_interval(tasks: dict, costs: dict, path: str) -> str:
  """Hessian every k steps: the metric's change and the cost."""
  plt = _plt()
  fig, (ax_metric, ax_cost) = _panels(plt, 2)
  ks = list(range(1, 6))
  for name, task in tasks.items():
    runs = [task["optimizers"]["AdaHessian"]["sensitivity"]["1.0"]]
    runs += [task["ablations"][f"k={k}"] for k in ks[1:]]
    means = [np.mean([float(r["metric"]) for r in rs]) for rs in runs]
    stds = [np.std([float(r["metric"]) for r in rs]) for rs in runs]
    ax_metric.errorbar(ks, np.array(means) - means[0], yerr=stds,
                       marker="o", capsize=2,
                       label=f"{name} ({task['metric']})")
  ax_metric.set(title="test metric minus k=1's (± std over seeds)",
                xlabel="Hessian every k steps")
  for name, c in costs.items():
    line, = ax_cost.plot(ks, [c["ratio"][f"k={k}"] for k in ks], marker="o",
                         label=f"{name}, measured")
    ax_cost.plot(ks, [1 + (c["F"] - 1) / k for k in ks], ls=":",
                 color=line.get_color())
  ax_cost.set(title="cost per step x Adam (dotted: 1 + (F-1)/k)",
              xlabel="Hessian every k steps")
  for ax in (ax_metric, ax_cost):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _save(fig, path, legend=False)


def report(out: str, docs: bool = False) -> None:
  """Writes `out/study_tables.md` and the plots (also to docs/images)."""
  tasks, costs, (minutes, runs) = _load(out)
  if not tasks:
    raise SystemExit(f"no study summaries under {out}: run --part first")
  sections = [
      f"{runs} runs, {minutes:.0f} min in all (each run's own time, "
      "compilation included).",
      "## Test metric at the tuned rate", headline(tasks),
      "## Learning-rate robustness", divergences(tasks),
      *(robustness(n, t) for n, t in tasks.items()),
      "## AdaHessian's options", ablation_table(tasks),
  ]
  if costs:
    sections += ["## Cost per step", cost_table(costs)]
  sections += ["## Tuning grids", tuning_grids(tasks)]
  path = os.path.join(out, "study_tables.md")
  with open(path, "w") as f:
    f.write("\n\n".join(sections) + "\n")
  print("\n\n".join(sections[:4]))
  plots = [plot_sensitivity(tasks, os.path.join(out, "study_lr.png")),
           plot_curves(tasks, os.path.join(out, "study_curves.png"))]
  if costs and all("k=5" in t["ablations"] for t in tasks.values()):
    plots.append(plot_interval(tasks, costs,
                               os.path.join(out, "study_interval.png")))
  if docs:
    for p in plots:
      shutil.copyfile(p, os.path.join(DOCS_IMAGES, os.path.basename(p)))
  print(f"wrote {path} and {', '.join(plots)}")
