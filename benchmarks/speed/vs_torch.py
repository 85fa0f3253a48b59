"""This library's AdaHessian step against torch-optimizer's, on the same models.

The PyTorch reference AdaHessian (``torch-optimizer`` 0.3.0's ``Adahessian``,
``backward(create_graph=True)`` then its second backward) and
``torch.optim.Adam``, on the torch twins of the benchmark models with the
same batches and thread count, timed in the same rounds as ``optax.adam``
and the fused AdaHessian step (``benchmarks/common/timing.py``). Reports ours
over torch's step, and each library's AdaHessian step over its own Adam step.
Install the peers with ``pip install -e ".[bench]"`` (torch 2.13.0 CPU).

Usage (from the repository root)::

  python -m benchmarks.speed.vs_torch                 # 2 threads, wall time
  python -m benchmarks.speed.vs_torch --threads 1     # 1 core, CPU time
"""

import argparse
import os
import warnings

from benchmarks.common import models as _models
from benchmarks.common import report as _report
from benchmarks.common import timing as _timing
from benchmarks.speed import train_steps as _steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def torch_variants(problem, threads, device):
  """torch's Adam and AdaHessian steps on the twin model."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  import torch_optimizer  # pylint: disable=import-outside-toplevel

  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  x = torch.from_numpy(problem.inputs)
  if problem.name == "cnn":
    x = x.permute(0, 3, 1, 2).contiguous()
  if problem.name == "transformer":
    x = x.long()
  x, y = x.to(device), torch.from_numpy(problem.labels).long().to(device)
  cls = _models.torch_models()[problem.name]
  sync = (torch.cuda.synchronize if device != "cpu" else lambda: None)

  def loss_fn(model):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           y.reshape(-1))

  variants, count = [], None
  for name in ("torch_adam", "torch_adahessian"):
    model = cls().to(device)
    count = sum(p.numel() for p in model.parameters())
    if name == "torch_adam":
      opt = torch.optim.Adam(model.parameters(), lr=_steps.LEARNING_RATE)
    else:
      # torch-optimizer's hessian_power k acts on sqrt(v): k=1 is the paper's.
      opt = torch_optimizer.Adahessian(model.parameters(),
                                       lr=_steps.LEARNING_RATE,
                                       hessian_power=1.0)

    def unit(model=model, opt=opt, create_graph=name != "torch_adam"):
      opt.zero_grad(set_to_none=True)
      loss_fn(model).backward(create_graph=create_graph)
      opt.step()
      sync()
    variants.append(_timing.Variant(name, unit))
  return variants, count


def measure(problem, threads, device, rounds, block, clock):
  params, batch = problem.params, problem.batch
  adam, ah = _steps.adam(), _steps.adahessian()
  variants = [
      _timing.Variant("adam", _timing.stepping(
          _steps.train_step(problem, adam, "adam"), params, adam.init(params),
          batch, [None])),
      _timing.Variant("fused", _timing.stepping(
          _steps.train_step(problem, ah, "fused"), params, ah.init(params),
          batch, [True])),
  ]
  tv, count = torch_variants(problem, threads, device)
  if count != _models.n_params(params):
    raise RuntimeError(f"{problem.name}: the torch model has {count} "
                       f"parameters, the Flax one {_models.n_params(params)}")
  variants += tv
  by = _timing.measure(variants, rounds, block, clock)
  r = lambda a, b: _timing.ratio(by, a, b)
  return {"params": count,
          "ours_over_torch": r("fused", "torch_adahessian"),
          "adam_over_torch_adam": r("adam", "torch_adam"),
          "ours_over_our_adam": r("fused", "adam"),
          "torch_over_torch_adam": r("torch_adahessian", "torch_adam"),
          "ms": {v.name: _timing.median_ms(v) for v in by.values()}}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--threads", type=int, choices=(0, 1, 2), default=2,
                      help="0: no pinning (GPU)")
  parser.add_argument("--models", default="mlp,cnn,transformer")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--block", type=float, default=None)
  parser.add_argument("--json", default=None)
  parser.add_argument("--images", default=None,
                      help="folder for the plot; 'none' to skip")
  args = parser.parse_args(argv)
  clock = _timing.configure(args.threads, with_torch=True)
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch_optimizer  # pylint: disable=import-outside-toplevel
  # torch-optimizer's documented use is backward(create_graph=True).
  warnings.filterwarnings("ignore", message=".*create_graph=True.*")
  on_gpu = jax.default_backend() == "gpu"
  device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
  rounds = args.rounds or (3 if args.quick else 20)
  block = args.block or (0.02 if args.quick else 0.1)
  print(_timing.header())
  print(f"torch {torch.__version__} on {device} ({args.threads or 'default'} "
        f"thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"torch-optimizer {torch_optimizer.__version__}")
  results = {}
  for problem in _models.make_problems(args.models.split(","), args.quick):
    print(f"[{problem.name}] timing...", flush=True)
    results[problem.name] = measure(problem, args.threads, device, rounds,
                                    block, clock)
  rows = [[name, f"{res['params']:,}",
           _report.mark(res["ours_over_torch"]["median"], 1.0),
           _report.fmt(res["adam_over_torch_adam"]["median"]),
           _report.fmt(res["ours_over_our_adam"]["median"]),
           _report.fmt(res["torch_over_torch_adam"]["median"])]
          for name, res in results.items()]
  print(_report.table(["model", "parameters", "ours / torch-optimizer",
                       "optax Adam / torch Adam", "ours / our Adam",
                       "torch AdaHessian / torch Adam"], rows))
  print("\n### Targets\n\n" + _report.checklist([
      (f"{name}: our AdaHessian step / torch-optimizer's = "
       f"{res['ours_over_torch']['median']:.2f} (target <= 1)",
       res["ours_over_torch"]["median"] <= 1.0)
      for name, res in results.items()]))
  images = args.images or ("none" if args.quick or on_gpu
                           else os.path.join(ROOT, "docs", "images"))
  if images != "none":
    plot(results, images, "_1thread" if args.threads == 1 else "")
  _report.save_json(args.json, {"results": results, "device": device,
                                "threads": args.threads})
  return results


# ---------------------------------------------------------------------------
# The docs' tables, each a function of a results file (``--json``,
# docs/results/vs_torch_<clock>.json).


def _clock(data) -> str:
  return "1 core" if data["threads"] == 1 else "2 threads"


def ratio_table(data) -> str:
  """Our step against torch-optimizer's, and each library's AdaHessian step
  over its own Adam step (medians of within-round ratios)."""
  fmt = _report.fmt
  return _report.table(
      [f"model ({_clock(data)})", "ours / torch-optimizer",
       "optax Adam / torch Adam", "ours / our Adam",
       "torch-optimizer / torch Adam"],
      [[name, f"**{fmt(res['ours_over_torch']['median'])}**",
        fmt(res["adam_over_torch_adam"]["median"]),
        fmt(res["ours_over_our_adam"]["median"]),
        fmt(res["torch_over_torch_adam"]["median"])]
       for name, res in data["results"].items()])


def ms_table(data) -> str:
  """Milliseconds per step (medians)."""
  cols = {"adam": "optax Adam", "fused": "ours", "torch_adam": "torch Adam",
          "torch_adahessian": "torch-optimizer"}
  return _report.table(
      [f"model ({_clock(data)})"] + list(cols.values()),
      [[name] + [_report.fmt(res["ms"][c], 1) for c in cols]
       for name, res in data["results"].items()])


def values(data) -> dict:
  """Ranges quoted in the prose."""
  res = list(data["results"].values())
  def span(key):
    xs = [r[key]["median"] for r in res]
    return f"{min(xs):.2f}–{max(xs):.2f}"
  out = {"ours_over_torch": span("ours_over_torch"),
         "ours_over_our_adam": span("ours_over_our_adam"),
         "torch_over_torch_adam": span("torch_over_torch_adam")}
  for name, r in data["results"].items():
    out[f"ours_over_torch:{name}"] = f"{r['ours_over_torch']['median']:.2f}"
  return out


def plot(results, image_dir, tag):
  import numpy as np  # pylint: disable=import-outside-toplevel
  plt, save = _report.figure_saver(image_dir, tag)
  names = list(results)
  fig, ax = plt.subplots(figsize=(6.2, 3.8))
  x = np.arange(len(names))
  series = [("adam", "optax.adam"), ("fused", "adahessian-optax"),
            ("torch_adam", "torch.optim.Adam"),
            ("torch_adahessian", "torch-optimizer Adahessian")]
  for i, (col, label) in enumerate(series):
    ax.bar(x + (i - 1.5) * 0.2, [results[n]["ms"][col] for n in names], 0.2,
           label=label)
  ax.set_xticks(x, names)
  ax.set(yscale="log", ylabel="ms per step (median, log)",
         title="Same models and batches")
  ax.legend(fontsize=8)
  save(fig, "bench_torch")


if __name__ == "__main__":
  main()
