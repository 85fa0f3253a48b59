"""The delayed Hessian: AdaHessian refreshing every k steps, with the clip.

At AdaHessian's tuned rate (``benchmarks/study/robustness.py``'s, read from
its results file), the Hessian refreshed every k = 1...5 steps, without a
clip and with ``clip_threshold=0.1`` or ``0.01``, seeds 0-4 on the test
split, on the tanh MLP and the main job's CNN (the CNN chooses between
two compiled steps on the host, the MLP uses ``update_interval=k``).
What a delayed refresh saves per step is the speed suite's question
(``benchmarks.speed.step_cost``).

From the repository root (a few minutes on 2 cores, after the robustness
run, whose cache it shares)::

    python -m benchmarks.study.delayed

It writes ``docs/results/delayed_<task>.json``.
"""

import argparse
import json
import os
import statistics

from benchmarks.common import report
from benchmarks.common import timing
from benchmarks.study import robustness as rb
from benchmarks.study import run as study_run

KS = (1, 2, 3, 4, 5)


def configs(task_name: str) -> list:
  wd = 5e-4 if task_name == "digits CNN" else 1e-4
  out = []
  for clip in (None, 0.1, 0.01):
    for k in KS:
      options = (() if k == 1 else (("k", k),)) + (
          () if clip is None else (("clip_threshold", clip),))
      label = f"k={k}" + ("" if clip is None else f", clip_threshold={clip}")
      out.append(rb.Config(label, "adahessian", (-5, 1), tuple(sorted(options)),
                           wd))
  return out


def run_task(task, out: str, lr: float) -> dict:
  cache = study_run.Cache(out, False)
  result = {c.label: [rb.final(cache.run(task, c, lr, s, "test"))
                      for s in rb.TEST_SEEDS]
            for c in configs(task.name)}
  return {"task": task.name, "lr": lr, "ks": list(KS),
          "test_seeds": list(rb.TEST_SEEDS),
          "script": "python -m benchmarks.study.delayed",
          "machine": timing.header(), "runs": result}


def _cell(runs: list) -> str:
  values = [r["metric"] for r in runs]
  bad = sum(r["diverged"] for r in runs)
  return (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
          + (f" ({bad}/{len(runs)} failed)" if bad else ""))


def delayed_table(data: dict) -> str:
  """Test accuracy with the Hessian every k steps, with and without the
  clip, at AdaHessian's tuned rate."""
  rows = []
  for clip in ("", ", clip_threshold=0.1", ", clip_threshold=0.01"):
    rows.append([f"AdaHessian{clip or ''}"] + [
        _cell(data["runs"][f"k={k}{clip}"]) for k in data["ks"]])
  return report.table([f"{data['task']}: test acc % at lr "
                       f"{data['lr']:.3g}, Hessian every"]
                      + [f"k={k}" for k in data["ks"]], rows)


def values(data: dict) -> dict:
  out = {}
  for label, runs in data["runs"].items():
    out[f"failed:{label}"] = (
        f"{sum(r['diverged'] for r in runs)} of {len(runs)}")
    out[f"acc:{label}"] = _cell(runs)
  out["failed_no_clip_k>1"] = str(sum(
      r["diverged"] for label, runs in data["runs"].items()
      if "clip" not in label and label != "k=1" for r in runs))
  for clip in ("0.1", "0.01"):
    out[f"failed_clip_{clip}_k>1"] = str(sum(
        r["diverged"] for label, runs in data["runs"].items()
        if label.endswith(f"clip_threshold={clip}")
        and not label.startswith("k=1,") for r in runs))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("results", "study",
                                                    "robustness"))
  parser.add_argument("--results", default=rb.RESULTS)
  args = parser.parse_args(argv)
  print(timing.header(), flush=True)
  for task in rb.tasks(False):
    with open(os.path.join(args.results,
                           f"robustness_{rb.slug(task.name)}.json")) as f:
      lr = json.load(f)["configs"]["AdaHessian"]["tuned_lr"]
    data = run_task(task, args.out, lr)
    report.save_json(os.path.join(args.results,
                                  f"delayed_{rb.slug(task.name)}.json"), data)
    print(delayed_table(data))


if __name__ == "__main__":
  main()
