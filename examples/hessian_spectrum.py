"""The Hessian of the digits CNN: at initialisation and after Adam, AdamW, AdaHessian.

The network, data and training step are those of ``examples/digits.py``
(imported from there). For each optimizer it trains the CNN from the same
initialisation on the same batches, tracks the top Hessian eigenvalue (the
sharpness) every few steps, and at initialisation and after training
computes the top eigenvalues, the trace and the eigenvalue spectral density
(ESD) of the training loss on a fixed batch of training images. The Hessian
is that of the model in eval mode (BatchNorm's running statistics, no
dropout): a deterministic function of the parameters.

    python examples/hessian_spectrum.py            # about 5 minutes on 2 cores
    python examples/hessian_spectrum.py --smoke    # seconds, for tests

It prints a table, writes ``hessian_spectrum.json`` and two plots (the ESDs,
and the top eigenvalue during training) to ``--out`` (default ``results/``);
a full run also copies the plots to ``docs/images/``.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402  pylint: disable=wrong-import-position

import adahessian_optax as aho  # noqa: E402  pylint: disable=wrong-import-position

OPTIMIZERS = ("Adam", "AdamW", "AdaHessian")
DOCS_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                           "docs", "images")


@functools.lru_cache(maxsize=None)
def _params_loss(graphdef):
  """The eval-mode loss of `(params, (rest, x, y))`, one function per graph.

  The model's other state (BatchNorm's running statistics) travels in the
  batch, so this one function serves every point of training, and the
  analysis compiles its Hessian-vector product once.
  """
  def loss(params, batch):
    rest, x, y = batch
    model = nnx.merge(graphdef, params, rest)
    model.eval()  # running statistics, no dropout
    return digits.loss_fn(model, x, y)
  return loss


def _dataset(graphdef, model_state, x, y):
  """`(loss, params)`: the loss on `(x, y)` as a DatasetLoss of one batch."""
  model = nnx.merge(graphdef, model_state)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  data = aho.DatasetLoss(_params_loss(graphdef), [(rest, x, y)],
                         size_fn=lambda batch: len(batch[2]))
  return data, params


def top3(data, params, max_steps):
  """The three largest eigenvalues (Lanczos to tol 1e-4)."""
  return aho.hessian_eigenvalues(data, params, 0, k=3, n_steps=max_steps)[0]


def sharpness(graphdef, model_state, x, y, max_steps):
  """The top eigenvalue."""
  return float(top3(*_dataset(graphdef, model_state, x, y), max_steps)[0])


def analyse(graphdef, model_state, x, y, sizes):
  """Top-3 eigenvalues, the trace (per layer too) and the ESD.

  Called outside jit: Python loops around jitted products, which on a CPU
  run convolutions faster than a compiled loop.
  """
  n_trace, num_probes, num_steps, max_steps = sizes
  data, params = _dataset(graphdef, model_state, x, y)
  top = top3(data, params, max_steps)
  trace = aho.hessian_trace(data, params, 1, n_samples=n_trace)
  esd = aho.hessian_spectrum(data, params, 2, n_samples=num_probes,
                             n_steps=num_steps)
  return top, trace, esd


def _summary(top, trace, esd) -> dict:
  per_layer = {name: float(sum(jax.tree.leaves(layer)))
               for name, layer in trace.per_leaf.items()}
  return {"top3": np.asarray(top).tolist(),
          "trace": float(trace.estimate), "trace_stderr": float(trace.stderr),
          "trace_per_layer": per_layer,
          "esd_nodes": np.asarray(esd.nodes).tolist(),
          "esd_weights": np.asarray(esd.weights).tolist()}


def train(spec, data, args, analysis_batch):
  """Trains one optimizer, tracking the sharpness; returns its record."""
  x_train, y_train, x_test, y_test = data
  steps_per_epoch = len(x_train) // args.batch_size
  total = args.epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, spec.learning_rate, warmup_steps=min(steps_per_epoch,
                                                total // 4 + 1),
      decay_steps=total)
  model = digits.CNN(nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, spec.make(schedule, args.seed),
                            wrt=nnx.Param)
  model_graphdef = nnx.graphdef(model)
  graphdef, state = nnx.split((model, optimizer))
  train_step = digits.make_train_step(spec, graphdef)
  order_rng = np.random.default_rng(args.seed)  # the same batches for all
  steps, tracked = [], []
  bar = tqdm(total=total, desc=f"{spec.name:>12}", disable=args.no_progress,
             leave=False, dynamic_ncols=True)
  step = 0
  for _ in range(args.epochs):
    order = order_rng.permutation(len(x_train))
    for idx in np.split(order[:steps_per_epoch * args.batch_size],
                        steps_per_epoch):
      if step % args.track_every == 0:
        steps.append(step)
        tracked.append(sharpness(model_graphdef, state[0], *analysis_batch,
                                 args.max_steps))
      state, _ = train_step(state, jnp.asarray(x_train[idx]),
                            jnp.asarray(y_train[idx]))
      step += 1
      bar.update(1)
  bar.close()
  steps.append(step)
  tracked.append(sharpness(model_graphdef, state[0], *analysis_batch,
                           args.max_steps))
  _, test_acc = digits.evaluate(model_graphdef, state[0], jnp.asarray(x_test),
                                jnp.asarray(y_test))
  final = _summary(*analyse(model_graphdef, state[0], *analysis_batch,
                            args.sizes))
  return {"name": spec.name, "learning_rate": spec.learning_rate,
          "test_acc": float(test_acc), "track_steps": steps,
          "track_top": tracked, **final}


def initial(args, analysis_batch) -> dict:
  model = digits.CNN(nnx.Rngs(args.seed))
  out = analyse(nnx.graphdef(model), nnx.state(model), *analysis_batch,
                args.sizes)
  return {"name": "initialisation", **_summary(*out)}


def table(rows) -> str:
  lines = ["| model | test acc | top eigenvalues | trace (± stderr) |",
           "|---|---|---|---|"]
  for r in rows:
    acc = f"{r['test_acc']:.4f}" if "test_acc" in r else "-"
    top = ", ".join(f"{v:.3g}" for v in r["top3"])
    lines.append(f"| {r['name']} | {acc} | {top} | {r['trace']:.4g} "
                 f"± {r['trace_stderr']:.2g} |")
  return "\n".join(lines)


LAYERS = ("conv1", "conv2", "dense1", "dense2")


def results_table(data) -> str:
  """docs/analysis.md's table, from the results file (``--json``:
  docs/results/hessian_spectrum.json)."""
  lines = ["| | test accuracy | top eigenvalues | trace ± stderr | trace per "
           f"layer: {', '.join(LAYERS)} (BatchNorm: the rest) |",
           "|---|---|---|---|---|"]
  for r in data["rows"]:
    acc = f"{100 * r['test_acc']:.1f}%" if "test_acc" in r else "-"
    top = ", ".join(f"{v:.3g}" for v in r["top3"])
    layers = ", ".join(f"{r['trace_per_layer'][k]:.3g}" for k in LAYERS)
    lines.append(f"| {r['name']} | {acc} | {top} | {r['trace']:.3g} "
                 f"± {r['trace_stderr']:.2g} | {layers} |")
  return "\n".join(lines)


def values(data) -> dict:
  """Numbers the prose of docs/analysis.md quotes."""
  rows = {r["name"]: r for r in data["rows"]}
  first = rows.pop("initialisation")
  out = {"minutes": f"{data['seconds'] / 60:.0f}",
         "init top": f"{first['top3'][0]:.2g}"}
  flattening = [first["trace"] / r["trace"] for r in rows.values()]
  out["trace ratio"] = f"{min(flattening):.0f} to {max(flattening):.0f}"
  by_trace = sorted(rows, key=lambda n: rows[n]["trace"])
  by_top = sorted(rows, key=lambda n: rows[n]["top3"][0])
  out["flattest"], out["sharpest"] = by_trace[0], by_trace[-1]
  out["flattest by top"], out["sharpest by top"] = by_top[0], by_top[-1]
  out["largest final top"] = f"{max(r['top3'][0] for r in rows.values()):.2g}"
  out["peak tracked"] = f"{max(max(r['track_top']) for r in rows.values()):.2g}"
  peaks = [r["track_steps"][int(np.argmax(r["track_top"]))]
           for r in rows.values()]
  out["peak steps"] = f"{min(peaks)} to {max(peaks)}"
  out["last tracked"] = f"{max(r['track_top'][-1] for r in rows.values()):.2g}"
  accs = [100 * r["test_acc"] for r in rows.values()]
  out["accuracy"] = f"{min(accs):.1f} to {max(accs):.1f}%"
  return out


def plot(rows, out_dir: str) -> list:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5),
                           sharey=True)
  for ax, r in zip(np.atleast_1d(axes), rows):
    esd = aho.SpectralDensity(jnp.asarray(r["esd_nodes"]),
                              jnp.asarray(r["esd_weights"]))
    esd.plot(ax, color="C0")
    ax.set_title(f"{r['name']}: top {r['top3'][0]:.3g}")
  fig.suptitle("Hessian eigenvalue density of the digits CNN (eval mode)")
  fig.tight_layout()
  esd_png = os.path.join(out_dir, "hessian_esd.png")
  fig.savefig(esd_png, dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    if "track_top" in r:
      ax.plot(r["track_steps"], r["track_top"], label=r["name"])
  ax.set(xlabel="step", ylabel="top Hessian eigenvalue", yscale="log",
         title="Sharpness during training")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  top_png = os.path.join(out_dir, "hessian_top_eigenvalue.png")
  fig.savefig(top_png, dpi=110)
  plt.close(fig)
  return [esd_png, top_png]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--epochs", type=int, default=None,
                      help="default 15 (1 with --smoke)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--track-every", type=int, default=None,
                      help="steps between sharpness measurements "
                           "(default 25, 2 with --smoke)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny run for tests")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--json", default=None,
                      help="also write the results here, with the settings, "
                           "for the docs' table (docs/analysis.md reads "
                           "docs/results/hessian_spectrum.json)")
  args = parser.parse_args(argv)
  if args.epochs is None:
    args.epochs = 1 if args.smoke else 15
  if args.track_every is None:
    args.track_every = 2 if args.smoke else 25
  if args.smoke:
    args.batch_size = min(args.batch_size, 32)
  args.max_steps = 12 if args.smoke else 60
  # Probes for the trace; probes x Lanczos steps for the ESD; the most
  # Lanczos steps for the top eigenvalues.
  args.sizes = (6, 2, 8) if args.smoke else (100, 10, 50)
  args.sizes += (args.max_steps,)

  start = time.perf_counter()
  data = digits.load_data(args.seed, args.smoke, validation=False)
  n = 64 if args.smoke else 512
  analysis_batch = (jnp.asarray(data[0][:n]), jnp.asarray(data[1][:n]))
  rows = [initial(args, analysis_batch)]
  specs = {spec.name: spec for spec in digits.SPECS}
  for name in OPTIMIZERS:
    rows.append(train(specs[name], data, args, analysis_batch))

  print(f"\nThe digits CNN's Hessian on {n} training images (eval mode), "
        f"{args.epochs} epochs of batch {args.batch_size}")
  print(table(rows))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "hessian_spectrum.json"), "w") as f:
    json.dump(rows, f)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    settings = {"epochs": args.epochs, "batch_size": args.batch_size,
                "seed": args.seed, "track_every": args.track_every,
                "analysis_images": n, "trace_probes": args.sizes[0],
                "esd_probes": args.sizes[1], "esd_steps": args.sizes[2],
                "max_steps": args.max_steps, "smoke": args.smoke}
    with open(args.json, "w") as f:
      json.dump({"script": "python examples/hessian_spectrum.py "
                           + " ".join(sys.argv[1:] if argv is None else argv),
                 "settings": settings, "test_images": len(data[2]),
                 "jax": jax.__version__, "adahessian_optax": aho.__version__,
                 "platform": jax.devices()[0].platform,
                 "cpus": os.cpu_count(),
                 "seconds": time.perf_counter() - start, "rows": rows}, f)
      f.write("\n")
    print(f"wrote {args.json}")
  paths = plot(rows, args.out)
  if not args.smoke:
    for path in paths:
      shutil.copy(path, DOCS_IMAGES)
  print(f"wrote {', '.join(paths)} ({time.perf_counter() - start:.0f} s in "
        "all)")


if __name__ == "__main__":
  main()
