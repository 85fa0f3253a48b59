"""AdaHessian against AdamW, Adam and SGD: a Flax NNX CNN on handwritten digits.

The data are the 1,797 8x8 digit images bundled with scikit-learn (no
download). Each optimizer trains the same CNN (convolutions, BatchNorm,
Dropout) from the same initializations on the same batches, with one epoch
of linear warmup and then cosine decay of the learning rate, over several
seeds, at its tuned learning rate and at a larger one; the script prints a
table (test accuracy and loss, mean and spread over seeds, divergences at the
larger rate, time per step) and plots the loss curves with bands over seeds.

    python examples/digits.py                # the comparison, ~1 min on 2 cores
    python examples/digits.py --smoke        # a few seconds, for tests

The learning rates below were tuned by ``python -m benchmarks.study.run`` on a
validation split of the training set, never on the test set (see
``docs/study.md``).
"""

import argparse
import dataclasses
import functools
import json
import os
import shutil
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import adahessian_optax as aho

DOCS_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                         "docs", "images", "digits_loss.png")


class CNN(nnx.Module):
  """Two 3x3 convolutions with BatchNorm, average pooling, a Dropout MLP."""

  def __init__(self, rngs: nnx.Rngs, dropout: float = 0.2):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, rngs=rngs)
    self.dense1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dense2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.dense2(self.dropout(nnx.relu(self.dense1(x))))


@functools.cache
def cnn_rules():
  """AdaHessian's spatial averaging for the CNN: its convolution kernels over
  their 3x3 window, read from the model's layers (the same for every seed)."""
  return aho.spatial_rules(CNN(nnx.Rngs(0)))


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@dataclasses.dataclass(frozen=True)
class Spec:
  """An optimizer of the comparison.

  Attributes:
    name: its name in the tables.
    learning_rate: its tuned peak learning rate.
    make: ``(schedule, seed) -> optax.GradientTransformation``; everything
      that depends on the seed must live in the optimizer's state (as
      AdaHessian's probe key does), so that one compiled step serves every
      seed.
    needs_value_fn: whether ``update`` takes the loss closure ``value_fn``.
    sweep: an optional learning-rate grid (the study tunes on its own).
    refresh_every: refresh the Hessian every this many steps, choosing
      between two compiled steps on the host (``make`` then builds AdaHessian
      with ``update_interval=None``).
    ggn: give the loss as ``aho.ggn(logits, aho.SoftmaxCrossEntropy(labels))``
      (for the Gauss-Newton-Bartlett estimator).
    warmup: the fraction of the steps of linear warmup (default: one epoch).
  """

  name: str
  learning_rate: float
  make: Callable[[optax.Schedule, int], optax.GradientTransformation]
  needs_value_fn: bool = False
  sweep: tuple[float, ...] = ()
  refresh_every: int = 1
  ggn: bool = False
  warmup: Optional[float] = None


# The learning rates are the study's (python -m benchmarks.study.run --part
# cnn): the best of a half-decade grid by validation loss (mean log of the
# last two epochs' loss over 2 seeds) on a split of the training set;
# docs/study.md has every grid point's score.
SPECS = (
    Spec("AdaHessian", 0.3162,
         lambda lr, seed: aho.adahessian(lr, weight_decay=5e-4, key=seed,
                                         spatial_averaging=cnn_rules()),
         needs_value_fn=True),
    Spec("AdamW", 0.03162,
         lambda lr, seed: optax.adamw(lr, weight_decay=1e-2)),
    Spec("Adam", 0.03162, lambda lr, seed: optax.adam(lr)),
    Spec("SGD+momentum", 0.1,
         lambda lr, seed: optax.sgd(lr, momentum=0.9)),
)
EPOCHS = 20
# The main job's second learning rate, as a multiple of the tuned one.
LARGER = 5.0


def load_data(seed: int, smoke: bool, validation: bool):
  """Digits scaled to [0, 1], NHWC, split 80/20 (stratified)."""
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  labels = labels.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=0.2, random_state=seed, stratify=labels)
  if validation:  # tune on a split of the training set, never on the test set
    x_train, x_test, y_train, y_test = train_test_split(
        x_train, y_train, test_size=0.2, random_state=seed + 1,
        stratify=y_train)
  if smoke:
    x_train, y_train = x_train[:128], y_train[:128]
    x_test, y_test = x_test[:64], y_test[:64]
  return x_train, y_train, x_test, y_test


def make_train_step(spec: Spec, graphdef, refresh: Optional[bool] = None):
  """A jitted train step on the split (model, optimizer) state.

  Splitting once and jitting a function of the state with ``jax.jit`` avoids
  ``nnx.jit``'s per-call graph traversal, which would dominate steps this
  small. ``refresh`` (for ``spec.refresh_every > 1``) compiles the step with
  or without the Hessian refresh.
  """

  @jax.jit
  def train_step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    extra = {}
    if spec.needs_value_fn and refresh is not False:
      # Built before the gradient, so that the Hessian pass draws the same
      # dropout mask and leaves BatchNorm's running averages alone.
      extra["value_fn"] = (
          aho.ggn(aho.nnx_value_fn(lambda m, x: m(x), model, x),
                  aho.SoftmaxCrossEntropy(y)) if spec.ggn
          else aho.nnx_value_fn(loss_fn, model, x, y))
    if refresh is not None:
      extra["hessian_refresh"] = refresh
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, **extra)
    return nnx.state((model, optimizer)), loss

  return train_step


@functools.partial(jax.jit, static_argnums=0)
def evaluate(graphdef, model_state, x, y):
  """Test loss and accuracy in eval mode (running averages, no dropout)."""
  model = nnx.merge(graphdef, model_state)
  model.eval()
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def _with_peak(tx, learning_rate: float):
  """`tx` built on a unit schedule, times the peak rate held in its state.

  Every optimizer here ends with ``scale_by_learning_rate``, so this is the
  optimizer at ``learning_rate * schedule``; with the rate in the state, one
  compiled step serves every rate.
  """
  return optax.chain(tx, optax.inject_hyperparams(optax.scale)(
      step_size=learning_rate))


@functools.lru_cache(maxsize=None)
def _template(spec: Spec, total: int, warmup: int):
  """The optimizer object the compiled steps are traced with (seed 0)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup_steps=warmup, decay_steps=total)
  return schedule, _with_peak(spec.make(schedule, 0), 1.0)


_COMPILED = {}


def _compiled_steps(spec: Spec, graphdef, state, x, y):
  """`({refresh: compiled step}, compile seconds)`, compiled once per spec."""
  refreshes = (None,) if spec.refresh_every == 1 else (True, False)
  key = (spec, graphdef, x.shape)
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  start = time.perf_counter()
  _COMPILED[key] = {r: make_train_step(spec, graphdef, r).lower(
      state, x, y).compile() for r in refreshes}
  return _COMPILED[key], time.perf_counter() - start


def diverged(train_losses, final: float) -> bool:
  """A run that failed: a non-finite training loss, or a final training loss
  not below 90% of the first step's (it did not train: a collapse to chance
  has a final loss near the first, and can even end a little below it)."""
  return bool(not np.all(np.isfinite(train_losses))
              or not final < 0.9 * train_losses[0])


def train(spec: Spec, data, *, learning_rate: float, epochs: int,
          batch_size: int, seed: int, progress: bool = True):
  """Trains one optimizer; returns its curves and timings."""
  x_train, y_train, x_test, y_test = data
  steps_per_epoch = len(x_train) // batch_size
  total = epochs * steps_per_epoch
  # One epoch of linear warmup for everyone: without it AdaHessian's first,
  # Newton-like steps overshoot along directions of tiny curvature.
  warmup = (min(steps_per_epoch, total // 4 + 1) if spec.warmup is None
            else max(1, int(spec.warmup * total)))
  schedule, template = _template(spec, total, warmup)
  model = CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(
      model, _with_peak(spec.make(schedule, seed), learning_rate),
      wrt=nnx.Param)
  state = nnx.state((model, optimizer))
  # The template's graph (the same for every seed and rate) with this run's
  # state: its seed and rate are arrays in it.
  graphdef = nnx.graphdef((model, nnx.Optimizer(model, template,
                                                wrt=nnx.Param)))
  model_graphdef = nnx.graphdef(model)

  x0, y0 = jnp.asarray(x_train[:batch_size]), jnp.asarray(y_train[:batch_size])
  steps, compile_s = _compiled_steps(spec, graphdef, state, x0, y0)

  order_rng = np.random.default_rng(seed)  # the same batches for everyone
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  train_losses, test_losses, test_accs = [], [], []
  step_time, step = 0.0, 0
  bar = tqdm(total=total, desc=f"{spec.name:>12} lr={learning_rate:g}",
             disable=not progress, leave=False, dynamic_ncols=True)
  for _ in range(epochs):
    order = order_rng.permutation(len(x_train))
    batches = [(jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
               for idx in np.split(order[:steps_per_epoch * batch_size],
                                   steps_per_epoch)]
    epoch_losses = []
    start = time.perf_counter()
    for x, y in batches:
      refresh = (None if spec.refresh_every == 1
                 else step % spec.refresh_every == 0)
      state, loss = steps[refresh](state, x, y)
      epoch_losses.append(loss)
      step += 1
      bar.update(1)
    jax.block_until_ready(state)
    step_time += time.perf_counter() - start
    train_losses.extend(np.asarray(jnp.stack(epoch_losses)).tolist())
    test_loss, test_acc = evaluate(model_graphdef, state[0], x_test, y_test)
    test_losses.append(float(test_loss))
    test_accs.append(float(test_acc))
    bar.set_postfix(loss=f"{np.mean(train_losses[-steps_per_epoch:]):.3f}",
                    test_acc=f"{test_acc:.3f}")
  bar.close()
  final = float(np.mean(train_losses[-steps_per_epoch:]))
  finite = bool(np.all(np.isfinite(train_losses)))
  return {
      "name": spec.name,
      "learning_rate": learning_rate,
      "seed": seed,
      "train_loss": train_losses,
      "test_loss": test_losses,
      "test_acc": test_accs,
      "final_train_loss": final,
      "ms_per_step": 1e3 * step_time / total,
      "compile_s": compile_s,
      "finite": finite,
      "diverged": diverged(train_losses, final),
  }


def _mean_std(values, scale=1.0, digits=2) -> str:
  values = [scale * v for v in values]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "docs", "results", "digits.json")


def summarize(rows, meta: dict) -> dict:
  """The results file: each run's final numbers (no curves), and how the
  runs were made. ``results_table`` renders it."""
  def final(run):
    return {"seed": run["seed"], "test_acc": run["test_acc"][-1],
            "test_loss": run["test_loss"][-1],
            "final_train_loss": run["final_train_loss"],
            "diverged": run["diverged"], "finite": run["finite"],
            "ms_per_step": run["ms_per_step"]}
  return dict(meta, optimizers=[
      {"name": r["name"], "learning_rate": r["learning_rate"],
       "larger_multiplier": r["larger_multiplier"],
       "runs": [final(x) for x in r["runs"]],
       "larger_runs": [final(x) for x in r["larger_runs"]]} for r in rows])


def results_table(data: dict) -> str:
  """The comparison (mean ± std over seeds at each rate), from the results
  file that ``summarize`` wrote (docs/results/digits.json)."""
  rows = data["optimizers"]
  adam = next((r for r in rows if r["name"] == "Adam"), None)
  n, larger = len(rows[0]["runs"]), rows[0]["larger_multiplier"]
  lines = [
      f"| optimizer | lr | test acc % ({n} seeds) | test loss "
      f"| final train loss | at {larger:g}x lr: test acc % | diverged "
      "| ms/step | vs Adam |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    runs, big = r["runs"], r["larger_runs"]
    ms = statistics.median(run["ms_per_step"] for run in runs)
    rel = (f"{ms / statistics.median(a['ms_per_step'] for a in adam['runs']):.2f}x"
           if adam else "-")
    lines.append(
        f"| {r['name']} | {r['learning_rate']:g} "
        f"| {_mean_std([x['test_acc'] for x in runs], 100)} "
        f"| {_mean_std([x['test_loss'] for x in runs], digits=4)} "
        f"| {_mean_std([x['final_train_loss'] for x in runs], digits=4)} "
        f"| {_mean_std([x['test_acc'] for x in big], 100)} "
        f"| {sum(x['diverged'] for x in big)}/{len(big)} "
        f"| {ms:.2f} | {rel} |")
  return "\n".join(lines)


def values(data: dict) -> dict:
  """Numbers quoted in the prose, from the results file: ``acc:<name>``,
  ``larger_acc:<name>`` and ``larger_diverged:<name>`` (at the larger rate),
  ``vs_adam:<name>`` (the median step time over Adam's), ``larger`` (the
  multiplier), ``seeds``."""
  rows = data["optimizers"]
  out = {"larger": f"{rows[0]['larger_multiplier']:g}",
         "seeds": str(len(rows[0]["runs"]))}
  adam = next((r for r in rows if r["name"] == "Adam"), None)
  for r in rows:
    out[f"acc:{r['name']}"] = _mean_std([x["test_acc"] for x in r["runs"]],
                                        100)
    big = r["larger_runs"]
    out[f"larger_acc:{r['name']}"] = _mean_std([x["test_acc"] for x in big],
                                               100)
    out[f"larger_diverged:{r['name']}"] = (
        f"{sum(x['diverged'] for x in big)} of {len(big)}")
    if adam:
      ms = statistics.median(x["ms_per_step"] for x in r["runs"])
      base = statistics.median(a["ms_per_step"] for a in adam["runs"])
      out[f"vs_adam:{r['name']}"] = f"{ms / base:.2f}"
  return out


def table(rows) -> str:
  """The comparison of `compare`'s rows (the printed table)."""
  return results_table(summarize(rows, {}))


def _band(ax, curves, label):
  curves = np.asarray(curves)
  mean, std = curves.mean(0), curves.std(0)
  x = np.arange(1, curves.shape[1] + 1)
  line, = ax.plot(x, mean, label=label)
  ax.fill_between(x, mean - std, mean + std, color=line.get_color(),
                  alpha=0.2)


def plot(rows, path: str, steps_per_epoch: int) -> None:
  """Training and test loss per epoch, mean ± std over seeds (tuned rate)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(11, 4))
  for r in rows:
    per_epoch = [np.asarray(run["train_loss"]).reshape(
        -1, steps_per_epoch).mean(1) for run in r["runs"]]
    accs = [100 * run["test_acc"][-1] for run in r["runs"]]
    label = f"{r['name']} (lr {r['learning_rate']:g})"
    _band(ax_train, per_epoch, label)
    _band(ax_test, [run["test_loss"] for run in r["runs"]],
          f"{label}: {np.mean(accs):.1f}%")
  ax_train.set(title="training loss (epoch mean)", xlabel="epoch",
               ylabel="cross-entropy", yscale="log")
  ax_test.set(title="test loss (mean test accuracy)", xlabel="epoch",
              yscale="log")
  for ax in (ax_train, ax_test):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("Flax CNN on scikit-learn digits (8x8): mean ± std over "
               f"{len(rows[0]['runs'])} seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def compare(spec: Spec, data, args):
  """Every seed at the tuned rate and at ``args.larger`` times it."""
  def runs(learning_rate):
    return [train(spec, data, learning_rate=learning_rate, epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed + s,
                  progress=not args.no_progress)
            for s in range(args.seeds)]
  return {"name": spec.name, "learning_rate": spec.learning_rate,
          "runs": runs(spec.learning_rate),
          "larger_multiplier": args.larger,
          "larger_runs": runs(args.larger * spec.learning_rate)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results",
                      help="output directory (default: results/)")
  parser.add_argument("--epochs", type=int, default=None,
                      help=f"default {EPOCHS} (1 with --smoke)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0,
                      help="the data split and the first seed")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds per optimizer and rate (default 3; 1 with "
                           "--smoke)")
  parser.add_argument("--larger", type=float, default=LARGER,
                      help="the second rate, a multiple of the tuned one")
  parser.add_argument("--optimizers", nargs="+", default=None,
                      choices=[s.name for s in SPECS],
                      help="default: all (AdaHessian and Adam with --smoke)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny run for tests; does not touch docs/")
  parser.add_argument("--results", default=None,
                      help="the results file that the README's table is "
                           "rendered from (default: docs/results/"
                           "digits.json, written by the default run only)")
  parser.add_argument("--no-progress", action="store_true",
                      help="no tqdm bars")
  args = parser.parse_args(argv)
  if args.epochs is None:
    args.epochs = 1 if args.smoke else EPOCHS
  if args.seeds is None:
    args.seeds = 1 if args.smoke else 3
  if args.optimizers is None:
    args.optimizers = (["AdaHessian", "Adam"] if args.smoke
                       else [s.name for s in SPECS])
  if args.smoke:
    args.batch_size = min(args.batch_size, 32)

  start = time.perf_counter()
  data = load_data(args.seed, args.smoke, validation=False)
  rows = [compare(spec, data, args) for spec in SPECS
          if spec.name in args.optimizers]
  print()
  print(f"Flax CNN on sklearn digits: {len(data[0])} train / {len(data[2])} "
        f"test images, {args.epochs} epochs of batch {args.batch_size}, "
        f"seeds {args.seed}..{args.seed + args.seeds - 1}, "
        f"{jax.devices()[0].platform.upper()}")
  meta = {"script": "python examples/digits.py", "epochs": args.epochs,
          "batch_size": args.batch_size, "seeds": args.seeds,
          "first_seed": args.seed, "train_images": len(data[0]),
          "test_images": len(data[2]),
          "platform": jax.devices()[0].platform, "cpus": os.cpu_count(),
          "jax": jax.__version__, "adahessian_optax": aho.__version__}
  summary = summarize(rows, meta)
  report = results_table(summary)
  print(report)
  default_run = (not args.smoke and len(rows) == len(SPECS)
                 and (args.epochs, args.seeds, args.batch_size, args.seed,
                      args.larger) == (EPOCHS, 3, 64, 0, LARGER))
  results = args.results or (RESULTS if default_run else None)
  if results:
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "w") as f:
      json.dump(summary, f, indent=1)
      f.write("\n")
    print(f"wrote {os.path.relpath(results)}")

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "digits_results.md"), "w") as f:
    f.write(report + "\n")
  with open(os.path.join(args.out, "digits_results.json"), "w") as f:
    json.dump(rows, f)
  png = os.path.join(args.out, "digits_loss.png")
  plot(rows, png, len(data[0]) // args.batch_size)
  if default_run:
    os.makedirs(os.path.dirname(DOCS_PLOT), exist_ok=True)
    shutil.copyfile(png, DOCS_PLOT)
  print(f"wrote {png} ({time.perf_counter() - start:.0f} s in all)")
  bad = [r["name"] for r in rows if not all(x["finite"] for x in r["runs"])]
  if bad:
    raise SystemExit(f"non-finite training loss at the tuned rate for {bad}")


if __name__ == "__main__":
  main()
