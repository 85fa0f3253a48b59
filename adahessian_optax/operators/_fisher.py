r"""The empirical Fisher: the mean outer product of per-example gradients."""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from adahessian_optax import _pytree
from adahessian_optax import _tree
from adahessian_optax.operators import _curvature


@_pytree.dataclass
class EmpiricalFisher(_curvature.Curvature):
  """A loss given by its per-example terms; made by :func:`empirical_fisher`.

  Called on params it is the mean of the terms; its curvature is the
  empirical Fisher.

  Attributes:
    losses_fn: ``params -> array`` of per-example losses (or
      ``(params, batch) -> array``).
  """

  losses_fn: Callable[..., Any]

  def _terms(self, params, *batch):
    losses = jnp.asarray(self.losses_fn(params, *batch))
    if not jnp.issubdtype(losses.dtype, jnp.floating) or losses.size == 0:
      raise TypeError(
          "empirical_fisher: losses_fn must return a non-empty floating-point "
          f"array of per-example losses, got {losses.dtype} of shape "
          f"{losses.shape}")
    return losses.astype(_tree.at_least_float32(losses.dtype))

  def __call__(self, params: Any, *batch: Any) -> jax.Array:
    return jnp.mean(self._terms(params, *batch))

  def linearize(self, params, space, *batch, axis_name=None):
    leaves = space.select(params)
    with _curvature.forward_mode():
      losses, jvp = jax.linearize(
          lambda ls: self._terms(space.replace(params, ls), *batch), leaves)
    vjp = jax.linear_transpose(jvp, leaves)
    n = losses.size
    value = jnp.mean(losses)
    grad = vjp(jnp.full(losses.shape, 1 / n, losses.dtype))[0]
    if axis_name is not None:
      value = jax.lax.pmean(value, axis_name)
      grad = jax.lax.pmean(grad, axis_name)
    return value, grad, jax.tree_util.Partial(_fisher_product, jvp, vjp, n)


def _fisher_product(jvp, vjp, n: int, v: list) -> list:
  """`(1/N) J^T J v`, J the Jacobian of the per-example losses."""
  u = jvp(v)
  return vjp(u / n)[0]


def empirical_fisher(losses_fn: Callable[..., Any]) -> EmpiricalFisher:
  r"""A loss whose curvature is its empirical Fisher matrix.

  For a mean loss :math:`L(\theta) = \frac1N \sum_n \ell_n(\theta)` over
  :math:`N` examples (every entry of the array ``losses_fn`` returns is one
  :math:`\ell_n`),

  .. math::
    F = \frac1N \sum_{n=1}^N \nabla \ell_n \nabla \ell_n^\top
      = \frac1N J^\top J, \qquad J = \frac{\partial (\ell_1, \dots,
      \ell_N)}{\partial \theta},

  positive semi-definite and of rank at most :math:`N`. A product
  :math:`Fv` is a jvp of the per-example losses and its transpose (one
  forward pass kept, no second derivative). Unlike the GGN with labels
  drawn from the model (:func:`ggn`, the Fisher), the *empirical* Fisher
  uses the data's labels: it is not a curvature estimate in general
  (Kunstner et al.), but it is what many methods and papers call the
  Fisher, and hessian-eigenthings and curvlinops offer it.

  Pass the result wherever the analysis takes a loss (or to
  :func:`curvature_operator`); over a dataset give
  ``losses_fn(params, batch)`` and wrap it in :class:`DatasetLoss`.

  Args:
    losses_fn: ``params -> losses``, a floating-point array with one entry
      per example (any shape; each entry is one term of the mean).

  Returns:
    An :class:`EmpiricalFisher`: callable ``params -> mean loss``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> fisher = aho.empirical_fisher(lambda w: (x @ w - 1.0) ** 2)
    >>> # at w = 0 the gradients are -2 x_n: F = (4/2) X^T X = diag(2, 8)
    >>> op = aho.curvature_operator(fisher, jnp.zeros(2))
    >>> print(*(f"{v:.3f}" for v in aho.eigenpairs(op, key=0, k=2).values))
    8.000 2.000

  References:
    Kunstner, Hennig and Balles, `Limitations of the empirical Fisher
    approximation for natural gradient descent
    <https://arxiv.org/abs/1905.12558>`_, NeurIPS 2019.
  """
  if not callable(losses_fn):
    raise TypeError(
        "empirical_fisher: losses_fn must be a callable params -> per-example "
        f"losses, got {type(losses_fn).__name__}")
  return EmpiricalFisher(losses_fn)
