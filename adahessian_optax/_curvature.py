"""The curvature core: Hessian-vector products of a loss closure on a pytree.

Forward-over-reverse, ``jax.jvp(jax.grad(f), (params,), (v,))``: its primal
output is the gradient and its tangent output is :math:`Hv`, so the loss and
its gradient come with every product at no extra cost. Products are taken
with respect to the floating-point leaves of ``params`` only; the estimators
and the analysis tools work on those leaves as lists.
"""

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


def value_grad_hvp(value_fn: Callable[[Any], jax.Array], params: Any,
                   tangent: list, *, axis_name: Optional[str] = None):
  """`(value, grad, H tangent)` from one jvp-over-grad pass.

  `tangent`, `grad` and the product are lists like the float leaves of
  `params`. Not yet averaged over `axis_name` (see `axis_mean`).
  """
  value_and_grad, leaves = _value_and_grad_of_leaves(value_fn, params,
                                                     axis_name)
  (value, grad), (_, hv) = jax.jvp(value_and_grad, (leaves,), (tangent,))
  return value, grad, hv


def linearize(value_fn: Callable[[Any], jax.Array], params: Any, *,
              axis_name: Optional[str] = None):
  """`(value, grad, hvp)`: the primal pass once, `hvp(v)` a tangent pass each.

  For several products at the same params: on XLA:CPU this beat vmapping
  the tangents (batched tangents got slow layouts: 1.3x the time for 8).
  """
  value_and_grad, leaves = _value_and_grad_of_leaves(value_fn, params,
                                                     axis_name)
  (value, grad), tangent_map = jax.linearize(value_and_grad, leaves)
  return value, grad, lambda v: tangent_map(v)[1]


def axis_mean(tree: Any, axis_name: Optional[str]) -> Any:
  """`tree` averaged over the named axis (the identity for None)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)
