"""Helpers for using the loss closure under optax.masked and optax.partition."""

from typing import Any, Callable

import jax
import optax


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def unmask_params(partial_params: Any, full_params: Any) -> Any:
  r"""Fills the ``optax.MaskedNode`` holes of a partial params tree.

  Inside :func:`optax.masked` and :func:`optax.partition`, the inner
  transformation sees params in which every leaf (or subtree) that is not
  its own is replaced by ``optax.MaskedNode()``. This returns ``full_params``
  with the leaves that ``partial_params`` does hold taken from
  ``partial_params``:

  .. math::
    \mathrm{out}_i = \begin{cases} \mathrm{partial}_i & \text{if leaf } i
    \text{ is not masked,} \\ \mathrm{full}_i & \text{otherwise.} \end{cases}

  Derivatives with respect to ``partial_params`` therefore see the masked
  leaves as constants, which is exactly the restriction of the loss to the
  leaves the inner transformation owns.

  Args:
    partial_params: a params tree in which some leaves or subtrees are
      ``optax.MaskedNode()``.
    full_params: the complete params tree (the one the training step holds).

  Returns:
    A tree with the structure of ``full_params``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> full = {"w": jnp.ones(2), "emb": jnp.zeros(3)}
    >>> partial = {"w": jnp.full(2, 5.0), "emb": optax.MaskedNode()}
    >>> out = aho.unmask_params(partial, full)
    >>> print(out["w"], out["emb"])
    [5. 5.] [0. 0. 0.]
  """
  try:
    return jax.tree.map(
        lambda p, f: f if _is_masked(p) else p, partial_params, full_params,
        is_leaf=_is_masked)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "unmask_params: the partial params do not match the full params tree "
        "(pass the same params the training step gives to the optimizer). "
        f"Details: {e}") from e


def mask_like(partial_params: Any, full_tree: Any) -> Any:
  """`full_tree` with `optax.MaskedNode` where `partial_params` has one."""
  try:
    return jax.tree.map(
        lambda p, f: p if _is_masked(p) else f, partial_params, full_tree,
        is_leaf=_is_masked)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "the estimate does not match the params tree of the masked "
        f"transformation (estimate it at the full params). Details: {e}"
    ) from e


def masked_value_fn(value_fn: Callable[[Any], jax.Array],
                    full_params: Any) -> Callable[[Any], jax.Array]:
  r"""Makes a loss closure usable inside ``optax.masked`` / ``optax.partition``.

  Returns ``lambda p: value_fn(unmask_params(p, full_params))``: the loss as a
  function of the leaves the inner AdaHessian owns, with the other leaves held
  at their values in ``full_params``. Its Hessian diagonal is the matching
  part of the full Hessian's diagonal,
  :math:`\partial^2 L / \partial \theta_i^2` for every owned leaf
  :math:`\theta_i`. Called on a complete tree it is ``value_fn`` itself, so it
  can be passed to every member of an ``optax.partition``.

  Args:
    value_fn: the loss, a function of the complete params tree.
    full_params: the complete params at which the step is taken (inside a
      jitted step, the traced params).

  Returns:
    A function of the (possibly partial) params tree.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> params = {"w": jnp.ones(2), "emb": jnp.ones(3)}
    >>> loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(3.0 * p["emb"] ** 2)
    >>> tx = optax.partition(
    ...     {"ah": aho.adahessian(0.5, key=0), "sgd": optax.sgd(0.1)},
    ...     {"w": "ah", "emb": "sgd"})
    >>> state = tx.init(params)
    >>> updates, state = tx.update(
    ...     jax.grad(loss)(params), state, params,
    ...     value_fn=aho.masked_value_fn(loss, params))
    >>> print(jnp.round(updates["w"], 3), updates["emb"])
    [-0.5 -0.5] [-0.6 -0.6 -0.6]
  """
  if not callable(value_fn):
    raise TypeError(
        "masked_value_fn: value_fn must be a callable params -> scalar loss, "
        f"got {type(value_fn).__name__}")

  def partial_value_fn(params):
    return value_fn(unmask_params(params, full_params))

  return partial_value_fn
