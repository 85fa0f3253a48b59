"""What the analysis benchmarks share: the problems and their exact answers.

Two small networks on scikit-learn's digits (``common.models``: a tanh MLP
64-32-10 and a CNN with two 3x3 convolutions), briefly trained with Adam,
small enough that the Hessian and the generalized Gauss-Newton matrix are
built densely and diagonalised; the errors of an estimate against those
spectra; and the timer both scripts use (``common.timing``: interleaved
rounds, within-round ratios).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

import adahessian_optax as aho
from benchmarks.common import models
from benchmarks.common import timing

UNIT_BLOCK_S = 0.1  # seconds per timed block of one product, one gradient


def loss_fn(name, params, batch):
  """Cross-entropy of the exact-Hessian network `name` (common.models)."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(
      models.small_apply(name, params, x), y).mean()


def ggn_loss(name, batch):
  """The same loss as an ``aho.ggn``: its curvature is the GGN."""
  x, y = batch
  return aho.ggn(lambda p: models.small_apply(name, p, x),
                 aho.SoftmaxCrossEntropy(y))


def load_data():
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  return images, labels.astype(np.int32)


def train(name, params, batch, steps=200):
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(name, p, batch))(params)
    updates, state = tx.update(grads, state)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


def exact_hessian(value_fn, params, chunk=64):
  """The dense Hessian in float64, built from HVPs in chunks of columns."""
  flat, unravel = ravel_pytree(params)
  grad = jax.grad(lambda f: value_fn(unravel(f)))
  columns = jax.jit(jax.vmap(lambda v: jax.jvp(grad, (flat,), (v,))[1]))
  eye = np.eye(flat.size, dtype=np.float32)
  hess = np.concatenate([np.asarray(columns(eye[i:i + chunk]), np.float64)
                         for i in range(0, flat.size, chunk)])
  return (hess + hess.T) / 2


def exact_ggn(name, params, batch):
  """The dense GGN ``(1/B) sum_b J_b^T (diag p_b - p_b p_b^T) J_b`` in
  float64, from the Jacobian of the logits (independent of ``aho.ggn``)."""
  x, _ = batch
  flat, unravel = ravel_pytree(params)
  logits_fn = lambda f: models.small_apply(name, unravel(f), x)
  jac = np.asarray(jax.jit(jax.jacrev(logits_fn))(flat), np.float64)
  probs = np.asarray(jax.nn.softmax(logits_fn(flat)), np.float64)
  n, c, d = jac.shape
  h_out = np.einsum("bc,cd->bcd", probs, np.eye(c)) - np.einsum(
      "bc,bd->bcd", probs, probs)
  hj = np.einsum("bce,bed->bcd", h_out, jac).reshape(n * c, d)
  ggn = jac.reshape(n * c, d).T @ hj / n
  return (ggn + ggn.T) / 2


@dataclasses.dataclass
class Problem:
  """A trained network, its batch and the exact spectra at its weights."""

  name: str
  params: dict
  batch: tuple
  hessian_eigs: np.ndarray  # ascending
  ggn_eigs: np.ndarray = None  # ascending, when asked for
  setup_s: float = 0.0

  @property
  def dim(self) -> int:
    return int(self.hessian_eigs.size)

  @property
  def sigma(self) -> float:
    """The smoothing width of the densities: 1% of the spectrum's range."""
    return 0.01 * float(self.hessian_eigs.max() - self.hessian_eigs.min())

  def value_fn(self, params):
    return loss_fn(self.name, params, self.batch)

  def describe(self) -> str:
    top = self.hessian_eigs[::-1]
    out = (f"{self.name}: {self.dim} parameters, batch "
           f"{len(self.batch[1])}; exact Hessian top {top[:3]}, bottom "
           f"{self.hessian_eigs[:2]}, trace {self.hessian_eigs.sum():.4f}")
    if self.ggn_eigs is not None:
      out += f"; exact GGN top {self.ggn_eigs[::-1][:2]}"
    return out


def make_problem(name, batch, quick, ggn=False) -> Problem:
  """`name` trained on `batch` (20 Adam steps for `quick`, else 200)."""
  start = time.perf_counter()
  params = jax.tree.map(jnp.asarray,
                        models.small_params(name, np.random.default_rng(0)))
  params = train(name, params, batch, steps=20 if quick else 200)
  value_fn = lambda p: loss_fn(name, p, batch)
  problem = Problem(name, params, batch,
                    np.linalg.eigvalsh(exact_hessian(value_fn, params)))
  if ggn:
    problem.ggn_eigs = np.linalg.eigvalsh(exact_ggn(name, params, batch))
  problem.setup_s = time.perf_counter() - start
  return problem


def batch_of(images, labels, n):
  return jnp.asarray(images[:n]), jnp.asarray(labels[:n])


# --------------------------------------------------------------------------
# Errors against the exact spectra.


def density_l1(nodes, weights, exact_eigs, sigma):
  """L1 distance of two Gaussian-smoothed spectra on a common grid."""
  nodes, weights = np.asarray(nodes), np.asarray(weights)
  keep = np.isfinite(nodes)  # a peer pads short runs with NaN nodes
  nodes, weights = np.where(keep, nodes, 0.0), np.where(keep, weights, 0.0)
  low, high = exact_eigs.min() - 5 * sigma, exact_eigs.max() + 5 * sigma
  grid = np.linspace(low, high, 4001)
  got = np.asarray(aho.SpectralDensity(jnp.asarray(nodes, jnp.float32),
                                       jnp.asarray(weights, jnp.float32))
                   .density(grid, sigma), np.float64)
  exact = aho.SpectralDensity(
      jnp.asarray(exact_eigs[None], jnp.float32),
      jnp.full((1, exact_eigs.size), 1 / exact_eigs.size)).density(grid, sigma)
  return float(np.trapezoid(np.abs(got - np.asarray(exact, np.float64)),
                            grid))


def errors(task, result, exact_eigs, sigma):
  """The relative error of a task's result (top-k: the largest over the k
  eigenvalues; trace: of the trace; esd: the L1 distance of the densities).
  `exact_eigs` ascending."""
  top = exact_eigs[::-1]
  if "top-" in task:
    k = int(task.split("top-")[1].split()[0])
    values = np.sort(np.asarray(result, np.float64))[::-1][:k]
    return float(np.max(np.abs(values - top[:k]) / np.abs(top[:k])))
  if task.startswith("trace"):
    trace = exact_eigs.sum()
    return float(abs(float(result) - trace) / abs(trace))
  return density_l1(*result, exact_eigs, sigma)


# --------------------------------------------------------------------------
# Timing.


def timed(tasks: dict, rounds: int, clock, units=None) -> dict:
  """Every callable of `tasks` and `units` timed in the same rounds.

  `units` (short things, a product or a gradient) are timed in blocks of
  ``UNIT_BLOCK_S``; a task is warmed once and timed one call per round.
  Returns the ``timing.Variant`` of each name, its times per round in
  ``.times``; medians and within-round ratios come from ``common.timing``.
  """
  work = [timing.Variant(name, unit) for name, unit in (units or {}).items()]
  work += [timing.Variant(name, task, block_s=0)
           for name, task in tasks.items()]
  return timing.measure(work, rounds, UNIT_BLOCK_S, clock)
