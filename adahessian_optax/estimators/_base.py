r"""The estimator contract: Sophia's, with AdaHessian's fused step on top.

An estimator of the Hessian diagonal is an
:class:`optax.GradientTransformationExtraArgs` whose
``update(updates, state, params, *, value_fn)`` ignores ``updates`` and
returns the estimate (cast to the params' dtypes) and its next state: what
:func:`optax.contrib.sophia` takes as ``hessian_diagonal_fn``, and what
AdaHessian's ``estimator=`` takes.

This library's estimators keep configuration apart from state, as kfac-jax
does: the configuration is an :class:`Estimator` (frozen, hashable, with one
verb, :meth:`Estimator.estimate`, that takes the key), the state an
:class:`EstimatorState` whose only array is the key, with the configuration
as static structure. So a free function can make the estimate from the state
alone: :func:`value_grad_and_hessian`, AdaHessian's fused step (the value,
the gradient and the estimate from one pass), as
``optax.value_and_grad_from_state`` reads what a state cached.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import optax.tree

from adahessian_optax import _checks
from adahessian_optax import _probes
from adahessian_optax import _xla_cpu


class Estimate(NamedTuple):
  """What one estimator pass returns.

  Attributes:
    value: the loss at `params` (None when not asked for).
    grad: its gradient, a pytree like `params` (None when not asked for).
    diagonal: the estimate of the curvature's diagonal, a pytree like
      `params` in at least float32: the signed Hutchinson estimate
      :math:`\\frac1S\\sum_s z_s \\odot C z_s`, or the never-negative
      Gauss-Newton-Bartlett estimate of the GGN diagonal.
  """

  value: Any
  grad: Any
  diagonal: Any


class Estimator:
  """The configuration of a curvature-diagonal estimator, and its verb.

  Subclasses are frozen dataclasses (hashable: they are static structure of
  the :class:`EstimatorState`) that implement :meth:`estimate`.
  """

  def estimate(self, value_fn: Any, params: Any, key: jax.Array, *,
               value_and_grad: bool) -> Estimate:
    """The estimate at `params` from the raw key data `key`.

    With ``value_and_grad``, the caller takes the value and the gradient
    from this pass (AdaHessian's fused step); without, only the diagonal is
    used and the estimator may skip the rest.
    """
    raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EstimatorState:
  """The state of an estimator: its key, and its configuration (static).

  Attributes:
    key: raw ``uint32`` key data, split at every estimate (raw data rather
      than a typed key, so that Flax's msgpack can save it).
    estimator: the :class:`Estimator` (static: not an array, not changed by
      a checkpoint).
  """

  key: jax.Array
  estimator: Estimator = dataclasses.field(metadata={"static": True})


def _register_with_flax_serialization() -> None:
  # flax.serialization (msgpack) keeps unregistered classes as opaque leaves;
  # registered, the state is saved as {"key": ...}, as in 0.2 to 0.5.
  try:
    from flax import serialization  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  serialization.register_serialization_state(
      EstimatorState,
      lambda s: {"key": serialization.to_state_dict(s.key)},
      lambda s, d: dataclasses.replace(
          s, key=serialization.from_state_dict(s.key, d["key"])))


_register_with_flax_serialization()


def next_estimate(state: EstimatorState, value_fn: Any, params: Any, *,
                  value_and_grad: bool) -> tuple[Estimate, EstimatorState]:
  """The estimate and the advanced state: the only place the key is split."""
  next_key, key = _probes.split(jnp.asarray(state.key[...]))
  estimate = state.estimator.estimate(value_fn, params, key,
                                      value_and_grad=value_and_grad)
  return estimate, dataclasses.replace(state, key=next_key)


def transformation(estimator: Estimator, key: Any,
                   owner: str) -> optax.GradientTransformationExtraArgs:
  """`estimator` as a gradient transformation (see the module docstring).

  The estimate is traced through `_xla_cpu.call`, so that it runs at full
  speed inside a caller's control flow on XLA:CPU (Sophia's ``lax.cond``).
  """
  initial = EstimatorState(_probes.key_data(key, owner), estimator)

  def init_fn(params):
    del params
    return initial

  def update_fn(updates, state, params=None, *, value_fn=None, obj_fn=None,
                **extra_args):
    del updates, extra_args
    _checks.check_params(f"{owner}.update", params)
    fn = _checks.check_value_fn(value_fn, obj_fn, f"{owner}.update")

    def diagonal_and_state(state, params):
      estimate, state = next_estimate(state, fn, params,
                                      value_and_grad=False)
      return estimate.diagonal, state
    diagonal, state = _xla_cpu.call(diagonal_and_state, state, params)
    return optax.tree.cast_like(diagonal, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HessianEstimate:
  r"""A curvature-diagonal estimate made by :func:`value_grad_and_hessian`.

  Pass it as ``tx.update(grads, state, params, hessian=estimate)``: the
  transformation takes the diagonal and the advanced estimator state from it,
  so the fused and the plain step draw the same probes (or labels).

  Attributes:
    diagonal: the estimate, a pytree like params (at least float32).
    estimator: the estimator's state after this estimate.
  """

  diagonal: Any
  estimator: EstimatorState


def value_grad_and_hessian(
    value_fn: Callable[[Any], jax.Array],
    params: Any,
    opt_state: Any,
) -> tuple[jax.Array, Any, HessianEstimate]:
  r"""The loss, its gradient and AdaHessian's estimate, from one pass.

  The fused training step: one forward-over-reverse pass
  ``jax.jvp(jax.grad(value_fn), (params,), (z,))`` yields the gradient
  :math:`g` (its primal output) and :math:`Hz` (its tangent), so

  .. math::
    (f(\theta),\ g,\ \tfrac1S \textstyle\sum_s z_s \odot H z_s)

  cost one Hessian-vector product and nothing more. Pass the gradient to
  ``tx.update`` as the updates and the estimate as ``hessian=``::

    loss, grads, hessian = aho.value_grad_and_hessian(loss_fn, params, state)
    updates, state = tx.update(grads, state, params, hessian=hessian)

  The estimator is the optimizer's own: its :class:`EstimatorState` (key and
  configuration) is read from ``opt_state``, which must hold exactly one,
  and the estimate carries the advanced state back to ``update``, so the
  fused and the plain call (``update(..., value_fn=...)``) give the same
  run. With a Gauss-Newton-Bartlett estimator (:func:`gnb_estimator`)
  ``value_fn`` is an :func:`ggn` loss and the pass is one forward pass and
  the backward passes of the true and the sampled labels; no second
  derivative. Calling this function is a refresh: with
  ``update_interval=1`` call it on every step; to refresh every ``k`` steps
  construct the optimizer with ``update_interval=None`` and call it on the
  refresh steps only, using :func:`jax.value_and_grad` and
  ``update(..., hessian_refresh=False)`` on the others (the delayed
  Hessian guide).

  Args:
    value_fn: the loss closure, ``params -> scalar`` (for the
      Gauss-Newton-Bartlett estimator, ``aho.ggn(output_fn, output_loss)``).
    params: the params, as given to ``tx.update``.
    opt_state: the optimizer state (or the part of it that holds the
      estimator's state).

  Returns:
    ``(value, grad, hessian)``: the loss, its gradient (a pytree like params)
    and a :class:`HessianEstimate` for ``tx.update(..., hessian=hessian)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 1e4]) * (p - 1.0) ** 2)
    >>> tx = aho.adahessian(learning_rate=0.5, key=0)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   value, grads, hessian = aho.value_grad_and_hessian(loss, params,
    ...                                                      state)
    ...   updates, state = tx.update(grads, state, params, hessian=hessian)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> print(jnp.round(params, 3))
    [1. 1.]

  References:
    Pearlmutter, `Fast Exact Multiplication by the Hessian
    <https://doi.org/10.1162/neco.1994.6.1.147>`_, Neural Computation 1994.
  """
  state = _checks.find_one(
      opt_state, EstimatorState, "EstimatorState (the state of a "
      "Hessian-diagonal estimator)", "for several AdaHessians, pass the part "
      "of the state that belongs to the one being refreshed")
  _checks.check_params("value_grad_and_hessian", params)
  value_fn = _checks.check_value_fn(value_fn, None, "value_grad_and_hessian")
  estimate, state = next_estimate(state, value_fn, params,
                                  value_and_grad=True)
  return estimate.value, estimate.grad, HessianEstimate(estimate.diagonal,
                                                        state)


def check_n_samples(n_samples: Any) -> int:
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  return int(n_samples)


def check_axis_name(axis_name: Optional[str]) -> Optional[str]:
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"axis_name must be a str or None, got {axis_name!r}")
  return axis_name
