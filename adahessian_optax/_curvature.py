"""The curvature core: Hessian-vector products of a loss closure on a pytree.

Forward-over-reverse, ``jax.jvp(jax.grad(f), (params,), (v,))``: its primal
output is the gradient and its tangent output is :math:`Hv`, so the loss and
its gradient come with every product at no extra cost. Products are taken
with respect to the floating-point leaves of ``params`` only; the estimators
and the analysis tools work on those leaves as lists.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _compose
from adahessian_optax import _tree


def scalar_loss(value_fn: Callable[[Any], Any], params: Any) -> jax.Array:
  """`value_fn(params)`, checked to be a real floating-point scalar."""
  out = _compose.call_value_fn(value_fn, params)
  if isinstance(out, (tuple, list, dict)):
    raise TypeError(
        "value_fn must return a scalar loss, got a "
        f"{type(out).__name__}; for a loss with auxiliary outputs pass "
        "`lambda p: loss(p)[0]`.")
  shape = jnp.shape(out)
  if shape != ():
    raise ValueError(f"value_fn must return a scalar loss, got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
    raise TypeError(
        "value_fn must return a floating-point loss, got dtype "
        f"{jnp.result_type(out)}")
  return out


@dataclasses.dataclass(frozen=True)
class SubBatchValueFn:
  """A mean loss over a batch whose Hessian is taken on its first examples.

  Made by :func:`sub_batch_value_fn`. Called on params it is the loss of the
  whole batch, ``w * loss_fn(p, head) + (1 - w) * loss_fn(p, tail)`` with
  ``w = size / n``; the curvature core takes Hessian-vector products of the
  head alone.

  Attributes:
    loss_fn: ``(params, batch) -> scalar``, a mean over the batch's examples.
    batch: a pytree of arrays with the examples along their leading axis.
    size: the number of leading examples the Hessian is taken on.
  """

  loss_fn: Callable[[Any, Any], jax.Array]
  batch: Any
  size: int

  def parts(self) -> tuple[float, Callable, Optional[Callable]]:
    """`(w, head loss weighted by w, tail loss weighted by 1 - w or None)`."""
    n = batch_size(self.batch)
    w = self.size / n
    head = jax.tree.map(lambda x: x[:self.size], self.batch)
    head_fn = lambda p: w * self.loss_fn(p, head)
    if self.size == n:
      return w, head_fn, None
    tail = jax.tree.map(lambda x: x[self.size:], self.batch)
    return w, head_fn, lambda p: (1 - w) * self.loss_fn(p, tail)

  def __call__(self, params: Any) -> jax.Array:
    _, head_fn, tail_fn = self.parts()
    value = head_fn(params)
    return value if tail_fn is None else value + tail_fn(params)


def batch_size(batch: Any) -> int:
  """The common leading dimension of a batch's array leaves."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if not sizes or None in sizes or len(sizes) != 1:
    raise ValueError(
        "the batch must be a pytree of arrays sharing their leading "
        f"(example) dimension, got leading dimensions {sorted(map(str, sizes))}")
  return sizes.pop()


def sub_batch_value_fn(loss_fn: Callable[[Any, Any], jax.Array], batch: Any,
                       fraction: float) -> SubBatchValueFn:
  r"""A loss closure whose Hessian is estimated on a fraction of the batch.

  As Sophia does, the gradient comes from the whole batch and the
  Hessian-vector product from its first :math:`m = \max(1,
  \mathrm{round}(f n))` examples. For a mean loss :math:`L = w L_m +
  (1 - w) L_{n-m}` with :math:`w = m / n`, the estimators take
  :math:`H_m z` (the Hessian of :math:`L_m`, so the estimate is unbiased for
  the sub-batch's Hessian diagonal) and the gradient as the sum of the two
  parts' gradients, so that the sub-batch's gradient is the primal output of
  the same forward-over-reverse pass: a step costs about
  :math:`1 + (F - 1) f` gradients, :math:`F` the cost of one product.

  Use it wherever a loss closure goes: ``value_grad_and_hessian``,
  ``update(..., value_fn=...)``, :func:`hutchinson_diagonal`. Called on
  params it returns the loss of the whole batch, so in the plain call compute
  the gradient of this closure (``jax.grad(value_fn)``), which XLA can then
  share with the estimator's pass. The loss must be a mean over independent
  examples: with BatchNorm in training mode, the two parts would be
  normalised with their own statistics.

  Args:
    loss_fn: ``(params, batch) -> scalar``, the mean loss over the batch's
      examples.
    batch: a pytree of arrays with the examples along their leading axis
      (shuffled, so that its first examples are a random sub-batch).
    fraction: :math:`f \in (0, 1]`, the share of the batch for the Hessian.

  Returns:
    A :class:`SubBatchValueFn` (a callable ``params -> scalar``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> x = jnp.array([1.0, 2.0, 3.0, 4.0])
    >>> loss = lambda w, x: jnp.mean(x * w ** 2)
    >>> value_fn = aho.sub_batch_value_fn(loss, x, fraction=0.5)
    >>> print(value_fn(jnp.ones(())))   # the whole batch's loss
    2.5
    >>> print(aho.hutchinson_diagonal(value_fn, jnp.ones(()), 0).diagonal)
    3.0
  """
  if not callable(loss_fn):
    raise TypeError(
        "sub_batch_value_fn: loss_fn must be a callable (params, batch) -> "
        f"scalar, got {type(loss_fn).__name__}")
  if (isinstance(fraction, bool)
      or not isinstance(fraction, (int, float))
      or not 0 < fraction <= 1):
    raise ValueError(
        f"sub_batch_value_fn: fraction must be a number in (0, 1], got "
        f"{fraction!r}")
  n = batch_size(batch)
  return SubBatchValueFn(loss_fn, batch, max(1, min(n, round(fraction * n))))


def _value_and_grad_of_leaves(value_fn, params, axis_name):
  """`float leaves -> (value, grad leaves)`, the other leaves held fixed."""
  split = _tree.FloatLeaves.of(params)

  def loss_of_leaves(leaves):
    value = scalar_loss(value_fn, split.replace(params, leaves))
    if axis_name is None:
      return value
    # Differentiate the axis mean: under shard_map's default check_vma=True,
    # autodiff already sums the gradient of a per-shard loss with respect to
    # replicated params (n times the mean); pmean makes it the mean. Under
    # pmap, `axis_mean` afterwards does it instead.
    return jax.lax.pmean(value, axis_name)

  return jax.value_and_grad(loss_of_leaves), split.select(params)


def _split(value_fn):
  """`(w, the function products are taken of, the rest or None)`."""
  if isinstance(value_fn, SubBatchValueFn):
    return value_fn.parts()
  return 1.0, value_fn, None


def _with_rest(value, grad, rest_fn, params, axis_name):
  """Adds the value and gradient of the part without products."""
  if rest_fn is None:
    return value, grad
  value_and_grad, leaves = _value_and_grad_of_leaves(rest_fn, params,
                                                     axis_name)
  rest_value, rest_grad = value_and_grad(leaves)
  return value + rest_value, [a + b for a, b in zip(grad, rest_grad)]


def value_grad_hvp(value_fn: Callable[[Any], jax.Array], params: Any,
                   tangent: list, *, axis_name: Optional[str] = None):
  """`(value, grad, H tangent)` from one jvp-over-grad pass.

  `tangent`, `grad` and the product are lists like the float leaves of
  `params`. Not yet averaged over `axis_name` (see `axis_mean`). For a
  :class:`SubBatchValueFn` the product is that of the sub-batch's loss.
  """
  w, hvp_fn, rest_fn = _split(value_fn)
  value_and_grad, leaves = _value_and_grad_of_leaves(hvp_fn, params,
                                                     axis_name)
  (value, grad), (_, hv) = jax.jvp(value_and_grad, (leaves,), (tangent,))
  value, grad = _with_rest(value, grad, rest_fn, params, axis_name)
  return value, grad, hv if w == 1.0 else [h / w for h in hv]


def linearize(value_fn: Callable[[Any], jax.Array], params: Any, *,
              axis_name: Optional[str] = None):
  """`(value, grad, hvp)`: the primal pass once, `hvp(v)` a tangent pass each.

  For several products at the same params: on XLA:CPU this beat vmapping
  the tangents (batched tangents got slow layouts: 1.3x the time for 8).
  """
  w, hvp_fn, rest_fn = _split(value_fn)
  value_and_grad, leaves = _value_and_grad_of_leaves(hvp_fn, params,
                                                     axis_name)
  (value, grad), tangent_map = jax.linearize(value_and_grad, leaves)
  value, grad = _with_rest(value, grad, rest_fn, params, axis_name)
  if w == 1.0:
    return value, grad, lambda v: tangent_map(v)[1]
  return value, grad, lambda v: [h / w for h in tangent_map(v)[1]]


def axis_mean(tree: Any, axis_name: Optional[str]) -> Any:
  """`tree` averaged over the named axis (the identity for None)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)
