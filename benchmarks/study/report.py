"""Tables and plots of the study from its cached summaries (run.py)."""

import json
import math
import os
import re
import shutil
import statistics

import numpy as np

from benchmarks.common import report

MULTIPLIERS = ("0.5", "1.0", "2.0", "3.0", "5.0", "10.0")
PARTS = ("small", "cnn", "lm", "lm-large")
# Rows of the options table: by kind, then by number.
_KINDS = ("k=", "probes", "Gaussian", "block", "sub-batch")
DOCS_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "docs", "images")


def summary_name(part: str, study_round: int) -> str:
  return f"summary{'' if study_round == 1 else study_round}_{part}.json"


def _load(out: str, study_round: int = 1) -> tuple[dict, tuple]:
  """`(tasks by name, (minutes, runs))` of the parts under `out`."""
  tasks, minutes, runs = {}, 0.0, 0
  for part in PARTS:
    path = os.path.join(out, summary_name(part, study_round))
    if not os.path.exists(path):
      continue
    with open(path) as f:
      data = json.load(f)
    tasks.update(data["tasks"])
    minutes += data["minutes"]
    runs += data["runs"]
  return tasks, (minutes, runs)


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
  def each(label, fn):
    return [fn(tasks[n], tasks[n]["optimizers"][label])
            if label in tasks[n]["optimizers"] else "-" for n in names]
  metrics = report.table(
      ["optimizer"] + [f"{n} ({tasks[n]['metric']})" for n in names],
      [[label] + each(label, lambda t, r: cell(r["sensitivity"]["1.0"],
                                               _digits(t)))
       for label in _labels(tasks)])
  rates = report.table(
      ["tuned peak lr"] + names,
      [[label] + each(label, lambda t, r: _lr(r["tuned"]))
       for label in _labels(tasks)])
  return metrics + "\n\n" + rates


def _lr(tuned: dict) -> str:
  return f"{tuned['lr']:g}" + (" (edge)" if tuned["edge"] else "")


def robustness(name: str, task: dict) -> str:
  """The paper's robustness table: rows optimizers, columns multipliers."""
  return report.table(
      [f"{name}: {task['metric']}"] + [f"{float(m):g}x" for m in MULTIPLIERS],
      [[label] + [cell(result["sensitivity"][m], _digits(task))
                  for m in MULTIPLIERS]
       for label, result in task["optimizers"].items()])


def divergences(tasks: dict) -> str:
  """Diverged runs over all tasks at each multiplier, per optimizer."""
  rows = []
  for label in _labels(tasks):
    counts = []
    for m in MULTIPLIERS:
      runs = [r for t in tasks.values() if label in t["optimizers"]
              for r in t["optimizers"][label]["sensitivity"][m]]
      counts.append(f"{sum(r['diverged'] for r in runs)}/{len(runs)}")
    rows.append([label] + counts)
  return report.table(["diverged runs, all tasks"]
                      + [f"{float(m):g}x" for m in MULTIPLIERS], rows)


def ablation_table(tasks: dict) -> str:
  """AdaHessian's options at its tuned rate, beside the default."""
  names = list(tasks)
  rows = [["default (k=1, 1 Rademacher probe)"] + [
      cell(tasks[n]["optimizers"]["AdaHessian"]["sensitivity"]["1.0"],
           _digits(tasks[n])) for n in names]]
  for label in sorted(_labels(tasks, "ablations"), key=_option_order):
    rows.append([label] + [
        cell(tasks[n]["ablations"][label], _digits(tasks[n]))
        if label in tasks[n]["ablations"] else "-" for n in names])
  return report.table(["AdaHessian at its tuned lr"] + names, rows)


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
  return report.save_figure(fig, path, dpi=100)


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
  plt = report.pyplot()
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
  plt = report.pyplot()
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


def plot_interval(tasks: dict, path: str) -> str:
  """Hessian every k steps: the test metric's change from k = 1.

  (What a delayed Hessian saves per step is the speed suite's:
  ``python -m benchmarks.speed.step_cost``.)
  """
  plt = report.pyplot()
  fig, (ax,) = _panels(plt, 1)
  ks = list(range(1, 6))
  for name, task in tasks.items():
    runs = [task["optimizers"]["AdaHessian"]["sensitivity"]["1.0"]]
    runs += [task["ablations"][f"k={k}"] for k in ks[1:]]
    means = [np.mean([float(r["metric"]) for r in rs]) for rs in runs]
    stds = [np.std([float(r["metric"]) for r in rs]) for rs in runs]
    ax.errorbar(ks, np.array(means) - means[0], yerr=stds, marker="o",
                capsize=2, label=f"{name} ({task['metric']})")
  ax.set(title="test metric minus k=1's (± std over seeds)",
         xlabel="Hessian every k steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path, legend=False)


def write(out: str, docs: bool = False, study_round: int = 1) -> None:
  """Writes `out/study_tables.md` (`study2_tables.md` for the second round)
  and the plots (also to docs/images)."""
  tasks, (minutes, runs) = _load(out, study_round)
  if not tasks:
    raise SystemExit(f"no study summaries under {out}: run --part first")
  prefix = "study" if study_round == 1 else f"study{study_round}"
  first = study_round == 1
  sections = [
      f"{runs} runs, {minutes:.0f} min in all (each run's own time, "
      "compilation included).",
      "## Test metric at the tuned rate", headline(tasks),
      "## Learning-rate robustness", divergences(tasks),
      *(robustness(n, t) for n, t in tasks.items()),
      *(("## AdaHessian's options", ablation_table(tasks)) if first else ()),
      "## Tuning grids", tuning_grids(tasks),
  ]
  path = os.path.join(out, f"{prefix}_tables.md")
  with open(path, "w") as f:
    f.write("\n\n".join(sections) + "\n")
  print("\n\n".join(sections[:4]))
  plots = [plot_sensitivity(tasks, os.path.join(out, f"{prefix}_lr.png")),
           plot_curves(tasks, os.path.join(out, f"{prefix}_curves.png"))]
  if first and all("k=5" in t["ablations"] for t in tasks.values()):
    plots.append(plot_interval(tasks,
                               os.path.join(out, "study_interval.png")))
  if docs:
    for p in plots:
      shutil.copyfile(p, os.path.join(DOCS_IMAGES, os.path.basename(p)))
  print(f"wrote {path} and {', '.join(plots)}")
