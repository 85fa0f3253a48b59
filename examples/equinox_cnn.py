"""AdaHessian on an Equinox CNN: scikit-learn's digits, against AdamW.

Equinox keeps PyTorch's layouts (convolution weights ``(out, in, kh, kw)``),
and its modules are the params pytree itself, so AdaHessian's default
spatial averaging finds the convolutions there and averages each kernel over
its 3x3 window; dense weights and biases keep their own estimate. The step
is the fused one (one forward-over-reverse pass gives the gradient and the
Hessian-vector product), in an ``eqx.filter_jit``-ed function over
``eqx.partition``/``eqx.combine``.

    python examples/equinox_cnn.py            # 3 seeds, ~1 min on 2 cores
    python examples/equinox_cnn.py --smoke    # a few steps, for the tests
"""

import argparse
import os
import statistics

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adahessian_optax as aho


class CNN(eqx.Module):
  """Two 3x3 convolutions, average pooling and a linear head, on 8x8x1."""

  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k2)
    self.head = eqx.nn.Linear(32 * 4 * 4, 10, key=k3)

  def __call__(self, x):  # x: (1, 8, 8), channels first as in PyTorch
    h = jax.nn.relu(self.conv1(x))
    h = jax.nn.relu(self.conv2(h))
    h = h.reshape(32, 4, 2, 4, 2).mean(axis=(2, 4))
    return self.head(h.reshape(-1))


def loss_fn(params, static, x, y):
  model = eqx.combine(params, static)
  logits = jax.vmap(model)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def load_data(smoke: bool):
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels.astype(np.int32), test_size=0.2, random_state=0,
      stratify=labels)
  if smoke:
    x_train, y_train, x_test, y_test = (x_train[:128], y_train[:128],
                                        x_test[:64], y_test[:64])
  return x_train, y_train, x_test, y_test


def make_tx(name: str, learning_rate: float, total: int, seed: int):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=max(1, total // 10),
      decay_steps=total)
  if name == "AdaHessian":
    # The default spatial averaging reads the Equinox Conv2d modules in the
    # params: the same rules as aho.spatial_rules(model).
    return aho.adahessian(schedule, weight_decay=5e-4, key=seed)
  return optax.adamw(schedule, weight_decay=1e-2)


def train(name: str, learning_rate: float, data, *, epochs: int,
          batch_size: int, seed: int):
  x_train, y_train, x_test, y_test = data
  model = CNN(jax.random.key(seed))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  steps_per_epoch = len(x_train) // batch_size
  tx = make_tx(name, learning_rate, epochs * steps_per_epoch, seed)
  opt_state = tx.init(params)

  @eqx.filter_jit
  def step(params, opt_state, x, y):
    value_fn = lambda p: loss_fn(p, static, x, y)
    if name == "AdaHessian":
      loss, grads, hessian = aho.value_grad_and_hessian(value_fn, params,
                                                        opt_state)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     hessian=hessian)
    else:
      loss, grads = jax.value_and_grad(value_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
    return eqx.apply_updates(params, updates), opt_state, loss

  @eqx.filter_jit
  def accuracy(params, x, y):
    logits = jax.vmap(eqx.combine(params, static))(x)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state, loss = step(params, opt_state, x_train[idx],
                                     y_train[idx])
      losses.append(float(loss))
  return losses, float(accuracy(params, x_test, y_test))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--out", default=None,
                      help="folder for a plot of the training losses")
  parser.add_argument("--no-progress", action="store_true")  # as the others
  args = parser.parse_args(argv)
  seeds, epochs = (1, 1) if args.smoke else (args.seeds, args.epochs)
  data = load_data(args.smoke)
  # The learning rates are those tuned on validation for the Flax CNN of
  # examples/digits.py (docs/study.md); not re-tuned for this model.
  rates = {"AdaHessian": 0.3162, "AdamW": 0.03162}
  curves = {}
  print("| optimizer | final train loss | test accuracy (%) |")
  print("|---|---|---|")
  for name, lr in rates.items():
    runs = [train(name, lr, data, epochs=epochs, batch_size=64, seed=s)
            for s in range(seeds)]
    curves[name] = [r[0] for r in runs]
    finals = [r[0][-1] for r in runs]
    accs = [100 * r[1] for r in runs]
    spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    print(f"| {name} | {statistics.mean(finals):.4f} ± {spread(finals):.4f} "
          f"| {statistics.mean(accs):.2f} ± {spread(accs):.2f} |")
  if args.out:
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, runs in curves.items():
      ax.plot(np.mean(runs, axis=0), label=name)
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title="Equinox CNN on digits (mean over seeds)")
    ax.legend()
    fig.savefig(os.path.join(args.out, "equinox_cnn_loss.png"), dpi=120,
                bbox_inches="tight")


if __name__ == "__main__":
  main()
