"""Loss landscapes of the digits CNN: Hessian eigenvectors, random directions.

The network, data and training step are those of ``examples/digits.py``
(imported from there). It trains the CNN briefly with Adam, then, on a
fixed batch of training images with the model in eval mode (BatchNorm's
running statistics, no dropout):

* the top two Hessian eigenpairs (Lanczos, ``aho.hessian_eigenvalues``);
* the loss along the top eigenvector (PyHessian's plot) and along a random
  filter-normalized direction (Li et al.'s), ``aho.loss_landscape`` on a
  1-D grid, with the curvature of the first at 0 compared with the top
  eigenvalue;
* the loss over the plane of the top two eigenvectors, a 2-D grid.

    python examples/landscape.py            # under a minute on 2 cores
    python examples/landscape.py --smoke    # seconds, for tests

It prints the numbers, writes ``landscape.json`` and two plots to ``--out``
(default ``results/``); a full run also copies the plots to ``docs/images/``.
"""

import argparse
import json
import os
import shutil
import time

import digits  # examples/digits.py: this script's folder is on sys.path
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adahessian_optax as aho

DOCS_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                           "docs", "images")


def train(data, args):
  """The CNN after ``args.epochs`` epochs of Adam at digits.py's tuned rate."""
  x_train, y_train = data[0], data[1]
  spec = next(s for s in digits.SPECS if s.name == "Adam")
  steps_per_epoch = len(x_train) // args.batch_size
  model = digits.CNN(nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(
      model, spec.make(optax.constant_schedule(spec.learning_rate),
                       args.seed), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  train_step = digits.make_train_step(spec, graphdef)
  order_rng = np.random.default_rng(args.seed)
  for _ in range(args.epochs):
    order = order_rng.permutation(len(x_train))
    for idx in np.split(order[:steps_per_epoch * args.batch_size],
                        steps_per_epoch):
      state, _ = train_step(state, jnp.asarray(x_train[idx]),
                            jnp.asarray(y_train[idx]))
  model, _ = nnx.merge(graphdef, state)
  return model


def eval_loss(model, x, y):
  """`(loss, params)`: the eval-mode loss on `(x, y)` as a function of the
  model's parameters (the other state held fixed)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    model = nnx.merge(graphdef, params, rest)
    model.eval()  # running statistics, no dropout
    return digits.loss_fn(model, x, y)

  return loss, params


def li_filter_axes(params):
  """Li et al.'s choice for this CNN: Flax's ``Conv`` and ``Linear`` keep
  their output channels on the last axis of their ``kernel``; biases and
  BatchNorm's scales get a zero direction (their ``ignore="biasbn"``)."""
  def rule(path, _):
    names = [getattr(k, "key", None) for k in path]
    return -1 if "kernel" in names else "zero"
  return jax.tree_util.tree_map_with_path(rule, params)


def tree_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                           for x in jax.tree.leaves(tree))))


def analyse(loss, params, args) -> dict:
  start = time.perf_counter()
  top = aho.hessian_eigenvalues(loss, params, key=0, k=2,
                                n_steps=args.n_steps)
  v1, v2 = [jax.tree.map(lambda v: v[i], top.vectors) for i in (0, 1)]
  random_dir = aho.filter_normalized_direction(
      1, params, filter_axes=li_filter_axes)
  # The slope along v1: with it and lambda_1, the second-order Taylor
  # model of the loss along v1.
  grad = jax.jit(jax.grad(loss))(params)
  slope = sum(np.vdot(g, v) for g, v in zip(jax.tree.leaves(grad),
                                             jax.tree.leaves(v1)))
  eigen_s = time.perf_counter() - start

  start = time.perf_counter()
  alphas = np.linspace(-0.5, 0.5, args.points_1d)  # PyHessian's range
  along_v1 = aho.loss_landscape(loss, params, [v1], alphas)
  along_random = aho.loss_landscape(loss, params, [random_dir], alphas)
  plane_axis = np.linspace(-0.5, 0.5, args.points_2d)
  plane = aho.loss_landscape(loss, params, [v1, v2],
                             (plane_axis, plane_axis))
  jax.block_until_ready(plane)
  grid_s = time.perf_counter() - start

  # The curve's curvature at 0, from the three points around it, and a
  # quadratic fitted to the middle fifth of the curve.
  mid, h = len(alphas) // 2, alphas[1] - alphas[0]
  curve = np.asarray(along_v1, np.float64)
  second_difference = (curve[mid + 1] - 2 * curve[mid] + curve[mid - 1]) / h**2
  near = np.abs(alphas) <= 0.1 + 1e-9
  fitted = 2 * np.polyfit(alphas[near], curve[near], 2)[0]
  return {
      "eigenvalues": np.asarray(top.values).tolist(),
      "converged": bool(top.info.converged),
      "slope_v1": float(slope),
      "lanczos_steps": int(top.info.n_steps),
      "curvature_second_difference": float(second_difference),
      "curvature_quadratic_fit": float(fitted),
      "params_norm": tree_norm(params),
      "random_direction_norm": tree_norm(random_dir),
      "alphas": alphas.tolist(),
      "loss_along_v1": np.asarray(along_v1).tolist(),
      "loss_along_random": np.asarray(along_random).tolist(),
      "plane_axis": plane_axis.tolist(),
      "plane": np.asarray(plane).tolist(),
      "eigen_s": eigen_s,
      "grid_points": 2 * len(alphas) + len(plane_axis) ** 2,
      "grid_s": grid_s,
  }


def plot(r, out_dir: str) -> list:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  alphas = np.asarray(r["alphas"])
  lam = r["eigenvalues"][0]
  base = r["loss_along_v1"][len(alphas) // 2]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  left.plot(alphas, r["loss_along_v1"], lw=2,
            label=f"top eigenvector $v_1$ ($\\lambda_1$ = {lam:.3g})")
  left.plot(alphas, base + r["slope_v1"] * alphas + 0.5 * lam * alphas ** 2,
            "k--", lw=1, label="Taylor: $L(\\theta) + \\alpha\\, g^\\top v_1 + "
                               "\\lambda_1 \\alpha^2 / 2$")
  left.set(title="along the top Hessian eigenvector (unit norm)",
           xlabel="$\\alpha$ in $\\theta + \\alpha v_1$", ylabel="loss")
  right.plot(alphas, r["loss_along_random"], lw=2, color="C2")
  right.set(title="along a random filter-normalized direction $d$",
            xlabel=f"$\\alpha$ in $\\theta + \\alpha d$   "
                   f"($\\|d\\|$ = {r['random_direction_norm']:.3g})")
  for ax in (left, right):
    ax.grid(alpha=0.3)
  left.legend(fontsize=9)
  fig.suptitle("Digits CNN after training: the loss on lines through the "
               "trained params (eval mode)")
  fig.tight_layout()
  line_png = os.path.join(out_dir, "landscape_1d.png")
  fig.savefig(line_png, dpi=90)
  plt.close(fig)

  axis = np.asarray(r["plane_axis"])
  plane = np.asarray(r["plane"])
  fig, ax = plt.subplots(figsize=(5.2, 4.4))
  # Logarithmic levels: the loss spans decades over the plane.
  levels = np.geomspace(plane.min(), plane.max(), 16)
  norm = matplotlib.colors.LogNorm(levels[0], levels[-1])
  filled = ax.contourf(axis, axis, plane.T, levels=levels, norm=norm,
                       cmap="viridis")
  ax.contour(axis, axis, plane.T, levels=levels, colors="white",
             linewidths=0.4)
  ax.plot(0, 0, "r+", ms=12, mew=2, label="trained params")
  ax.legend(loc="upper left", fontsize=8)
  bar = fig.colorbar(filled, ax=ax, label="loss (log scale)")
  bar.set_ticks(levels[::3], labels=[f"{v:.2g}" for v in levels[::3]])
  ax.set(xlabel=f"$\\alpha$ along $v_1$ ($\\lambda_1$ = {lam:.3g})",
         ylabel=f"$\\beta$ along $v_2$ ($\\lambda_2$ = "
                f"{r['eigenvalues'][1]:.3g})",
         title="Loss over the plane of the top two\nHessian eigenvectors")
  fig.tight_layout()
  plane_png = os.path.join(out_dir, "landscape_2d.png")
  fig.savefig(plane_png, dpi=90)
  plt.close(fig)
  return [line_png, plane_png]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--epochs", type=int, default=None,
                      help="default 10 (1 with --smoke)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny run for tests; does not touch docs/")
  parser.add_argument("--no-progress", action="store_true",
                      help="accepted for the examples' test runner")
  args = parser.parse_args(argv)
  if args.epochs is None:
    args.epochs = 1 if args.smoke else 10
  if args.smoke:
    args.batch_size = min(args.batch_size, 32)
  args.n_steps = 10 if args.smoke else 100
  args.points_1d = 11 if args.smoke else 41
  args.points_2d = 5 if args.smoke else 31

  start = time.perf_counter()
  data = digits.load_data(args.seed, args.smoke, validation=False)
  model = train(data, args)
  n = 64 if args.smoke else 512
  loss, params = eval_loss(model, jnp.asarray(data[0][:n]),
                           jnp.asarray(data[1][:n]))
  r = analyse(loss, params, args)
  r["images"] = n

  print(f"The digits CNN after {args.epochs} epochs of Adam, loss on {n} "
        f"training images (eval mode), {jax.devices()[0].platform.upper()}")
  print(f"top eigenvalues: {r['eigenvalues'][0]:.4g}, "
        f"{r['eigenvalues'][1]:.4g} ({r['lanczos_steps']} Lanczos steps, "
        f"converged: {r['converged']})")
  print(f"slope along v1: {r['slope_v1']:.4g}")
  print("curvature of the loss along v1 at 0: "
        f"{r['curvature_second_difference']:.4g} (second difference), "
        f"{r['curvature_quadratic_fit']:.4g} (quadratic fit on |a| <= 0.1)")
  print(f"|theta| = {r['params_norm']:.3g}, |d| = "
        f"{r['random_direction_norm']:.3g} (filter-normalized, biases and "
        "BatchNorm zero)")
  print(f"{r['grid_points']} grid points in {r['grid_s']:.1f} s, "
        f"eigenpairs in {r['eigen_s']:.1f} s")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "landscape.json"), "w") as f:
    json.dump(r, f)
  paths = plot(r, args.out)
  if not args.smoke:
    for path in paths:
      shutil.copy(path, DOCS_IMAGES)
  print(f"wrote {', '.join(paths)} ({time.perf_counter() - start:.0f} s in "
        "all)")


if __name__ == "__main__":
  main()
