"""AdaHessian's first steps without a warmup, and what tames them.

Swapped into Flax's NNX MNIST tutorial at the paper's rate (0.15, a constant
rate, no warmup), AdaHessian's training loss jumps by orders of magnitude in
the first steps before it recovers (issue 32). MNIST cannot be downloaded
here, so this script trains the tutorial's CNN (two 3x3 convolutions of 32
and 64 channels, each followed by ReLU and 2x2 average pooling, a dense
layer of 256, ReLU, 10 outputs; no BatchNorm, no Dropout) on
scikit-learn's 8x8 digits, with the tutorial's training (batch 32, 1,200
steps, a constant rate; ``optax.adamw(0.005, 0.9)``), and AdaHessian as a
user swaps it in: ``aho.adahessian(0.15, key=seed)``, with and without a
linear warmup (the first 10% of the steps) and the clips. 5 seeds each.

Reported per configuration: the training loss of the first steps (median
over seeds), the largest loss of the first 100 steps over the first step's,
and the final test accuracy.

From the repository root (a few minutes on 2 cores)::

    python -m benchmarks.study.first_steps
    python -m benchmarks.study.first_steps --quick --out /tmp/f   # seconds

It writes ``docs/results/first_steps.json``.
"""

import argparse
import dataclasses
import functools
import os
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adahessian_optax as aho
from benchmarks.common import report
from benchmarks.common import timing
from examples import digits

SEEDS = (0, 1, 2, 3, 4)
STEPS, BATCH, FIRST = 1200, 32, 12
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "docs", "results", "first_steps.json")


class TutorialCNN(nnx.Module):
  """The CNN of Flax's NNX MNIST tutorial (its input here 8x8, not 28x28)."""

  def __init__(self, rngs: nnx.Rngs, side: int = 8):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.linear1 = nnx.Linear((side // 4) ** 2 * 64, 256, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    pool = functools.partial(nnx.avg_pool, window_shape=(2, 2),
                             strides=(2, 2))
    x = pool(nnx.relu(self.conv1(x)))
    x = pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    return self.linear2(nnx.relu(self.linear1(x)))


@dataclasses.dataclass(frozen=True)
class Setting:
  """One optimizer as the user writes it: its constant rate, a warmup (the
  fraction of the steps, linear from 0) and AdaHessian's options."""

  label: str
  learning_rate: float
  adahessian: bool = True
  warmup: float = 0.0
  options: tuple = ()

  def make(self, steps: int, seed: int) -> optax.GradientTransformation:
    rate = (optax.join_schedules(
        [optax.linear_schedule(0.0, self.learning_rate,
                               int(self.warmup * steps)),
         optax.constant_schedule(self.learning_rate)],
        [int(self.warmup * steps)]) if self.warmup else self.learning_rate)
    if not self.adahessian:
      return optax.adamw(rate, 0.9)
    return aho.adahessian(rate, key=seed, **dict(self.options))


SETTINGS = (
    Setting("AdamW 0.005 (the tutorial's)", 0.005, adahessian=False),
    Setting("AdaHessian 0.15", 0.15),
    Setting("AdaHessian 0.15, warmup 10%", 0.15, warmup=0.1),
    Setting("AdaHessian 0.15, rms_clip_threshold=0.1", 0.15,
            options=(("rms_clip_threshold", 0.1),)),
    Setting("AdaHessian 0.15, clip_threshold=0.1", 0.15,
            options=(("clip_threshold", 0.1),)),
    Setting("AdaHessian 0.15, clip_threshold=0.01", 0.15,
            options=(("clip_threshold", 0.01),)),
    Setting("AdaHessian 0.15, warmup 10%, rms_clip_threshold=0.1", 0.15,
            warmup=0.1, options=(("rms_clip_threshold", 0.1),)),
)


def train(setting: Setting, data, seed: int, steps: int) -> dict:
  """One run: the training loss of every step and the final test accuracy."""
  x_train, y_train, x_test, y_test = data
  model = TutorialCNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, setting.make(steps, seed), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  spec = digits.Spec(setting.label, setting.learning_rate,
                     lambda s, seed: setting.make(steps, seed),
                     needs_value_fn=setting.adahessian)
  step = digits.make_train_step(spec, graphdef)
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(x_train))
                          for _ in range(steps * BATCH // len(x_train) + 1)])
  losses = []
  for t in range(steps):
    i = order[t * BATCH:(t + 1) * BATCH]
    state, loss = step(state, jnp.asarray(x_train[i]),
                       jnp.asarray(y_train[i]))
    losses.append(loss)
  losses = [float(v) for v in jax.device_get(losses)]
  model, _ = nnx.merge(graphdef, state)
  logits = model(jnp.asarray(x_test))
  acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_test)))
  final = float(np.mean(losses[-steps // 20:]))
  return {"seed": seed, "train_loss_first": losses[:FIRST],
          "peak_ratio": float(np.max(losses[:100]) / losses[0]),
          "peak_step": int(np.argmax(losses[:100])),
          "final_train_loss": final, "test_acc": 100 * acc,
          "diverged": digits.diverged(losses, final)}


def run(quick: bool) -> dict:
  data = digits.load_data(0, False, validation=False)
  steps = 40 if quick else STEPS
  seeds = SEEDS[:1] if quick else SEEDS
  settings = SETTINGS[:2] if quick else SETTINGS
  out = {}
  for setting in settings:
    start = time.perf_counter()
    out[setting.label] = [train(setting, data, s, steps) for s in seeds]
    print(f"{setting.label}: {time.perf_counter() - start:.0f} s", flush=True)
  return {"script": "python -m benchmarks.study.first_steps",
          "data": "scikit-learn digits, 8x8 (1,437 train / 360 test)",
          "steps": steps, "batch": BATCH, "seeds": list(seeds),
          "machine": timing.header(), "settings": out}


# ---------------------------------------------------------------------------
# Tables, each a function of the results file.


def _g(x: float) -> str:
  return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def first_steps_table(data: dict) -> str:
  """The training loss of the first steps (median over seeds)."""
  shown = (0, 1, 2, 3, 5, 7, FIRST - 1)
  rows = []
  for label, runs in data["settings"].items():
    rows.append([label] + [_g(statistics.median(r["train_loss_first"][t]
                                                for r in runs))
                           for t in shown])
  return report.table(["train loss (median of seeds) at step"]
                      + [str(t) for t in shown], rows)


def outcome_table(data: dict) -> str:
  """The largest early loss and the final accuracy."""
  rows = []
  for label, runs in data["settings"].items():
    peaks = [r["peak_ratio"] for r in runs]
    accs = [r["test_acc"] for r in runs]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    bad = sum(r["diverged"] for r in runs)
    rows.append([label, f"{_g(min(peaks))} – {_g(max(peaks))}",
                 f"{statistics.mean(accs):.2f} ± {spread:.2f}"
                 + (f" ({bad}/{len(runs)} failed)" if bad else "")])
  return report.table(
      ["optimizer", "largest loss of the first 100 steps / first step's "
       "(range over seeds)", f"test acc % after {data['steps']} steps"],
      rows)


def values(data: dict) -> dict:
  out = {}
  for label, runs in data["settings"].items():
    out[f"peak_max:{label}"] = _g(max(r["peak_ratio"] for r in runs))
    out[f"acc:{label}"] = f"{statistics.mean(r['test_acc'] for r in runs):.2f}"
  return out


def main(argv: Optional[list] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=None,
                      help="the results file (default docs/results/"
                           "first_steps.json; with --quick, required)")
  args = parser.parse_args(argv)
  if args.quick and not args.out:
    parser.error("--quick needs --out")
  print(timing.header(), flush=True)
  data = run(args.quick)
  path = args.out if args.out and args.out.endswith(".json") else (
      os.path.join(args.out, "first_steps.json") if args.out else RESULTS)
  report.save_json(path, data)
  print(first_steps_table(data))
  print()
  print(outcome_table(data))


if __name__ == "__main__":
  main()
