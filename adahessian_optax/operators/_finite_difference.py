r"""Hessian-vector products from differences of gradients.

For models whose layers have a custom VJP and no forward-mode rule (flash
attention kernels: Pallas, cuDNN, splash), ``jax.jvp`` of the gradient
fails; a difference of gradients needs reverse mode only.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _pytree
from adahessian_optax import _tree
from adahessian_optax.operators import _curvature

_METHODS = ("forward", "central")


@_pytree.dataclass
class FiniteDifference(_curvature.Curvature):
  """A loss whose Hessian products are differences of gradients; made by
  :func:`finite_difference`.

  Attributes:
    loss_fn: ``params -> scalar`` (or ``(params, batch) -> scalar``).
    method: ``"forward"`` or ``"central"``.
    step: the relative step :math:`h_0`, or None for the dtype's default.
  """

  loss_fn: Callable[..., Any]
  method: str = "central"
  step: Optional[float] = None

  def __call__(self, params: Any, *batch: Any) -> jax.Array:
    return self.loss_fn(params, *batch)

  def linearize(self, params, space, *batch, axis_name=None):
    value_and_grad, leaves = _curvature.value_and_grad_of_leaves(
        self.loss_fn, params, space, batch, axis_name)
    value, grad = value_and_grad(leaves)
    difference = functools.partial(_difference, self.loss_fn, space,
                                   self.method, self.step, axis_name)
    return value, grad, jax.tree_util.Partial(
        difference, _pytree.Box(params), batch, grad)


def default_step(dtype: Any, method: str) -> float:
  """The relative step that balances rounding and truncation errors:
  :math:`\\epsilon^{1/2}` (forward) or :math:`\\epsilon^{1/3}` (central)."""
  eps = float(jnp.finfo(dtype).eps)
  return eps ** 0.5 if method == "forward" else eps ** (1 / 3)


def _difference(loss_fn, space, method, step, axis_name, params, batch, grad,
                v: list) -> list:
  """`(g(θ + h v) - g(θ)) / h`, or the central difference, at the leaves."""
  params = params.value
  value_and_grad, leaves = _curvature.value_and_grad_of_leaves(
      loss_fn, params, space, batch, axis_name)
  wide = _tree.widen(leaves)
  dtype = min((x.dtype for x in leaves), key=lambda d: jnp.finfo(d).bits)
  h0 = default_step(dtype, method) if step is None else step
  norm = lambda xs: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in xs))
  v_wide = _tree.widen(v)
  v_norm = norm(v_wide)
  h = h0 * (1 + norm(wide)) / jnp.where(v_norm > 0, v_norm, 1)

  def grad_at(sign):
    moved = [(x + sign * h * d).astype(x0.dtype)
             for x, d, x0 in zip(wide, v_wide, leaves)]
    return _tree.widen(value_and_grad(moved)[1])

  if method == "forward":
    g0 = _tree.widen(grad)
    out = [(a - b) / h for a, b in zip(grad_at(1), g0)]
  else:
    out = [(a - b) / (2 * h) for a, b in zip(grad_at(1), grad_at(-1))]
  return [o.astype(x.dtype) for o, x in zip(out, v)]


def finite_difference(loss_fn: Callable[..., Any], *, method: str = "central",
                      step: Optional[float] = None) -> FiniteDifference:
  r"""A loss whose Hessian-vector products are differences of gradients.

  .. math::
    H v \approx \frac{g(\theta + h v) - g(\theta)}{h}
      \quad\text{(forward)}, \qquad
    H v \approx \frac{g(\theta + h v) - g(\theta - h v)}{2h}
      \quad\text{(central)},

  with :math:`h = h_0 (1 + \|\theta\|) / \|v\|` and :math:`h_0 =
  \epsilon^{1/2}` (forward) or :math:`\epsilon^{1/3}` (central),
  :math:`\epsilon` the params' machine epsilon: the steps that balance
  rounding against truncation, for relative errors of about
  :math:`\epsilon^{1/2}` and :math:`\epsilon^{2/3}` (float32: about
  :math:`3 \cdot 10^{-4}` and :math:`5 \cdot 10^{-6}`; in bfloat16 both are
  poor, see the scale guide). Only gradients are taken, so it works
  through layers that define a custom VJP and no forward-mode rule
  (flash-attention kernels), where ``jax.jvp`` of the gradient fails.

  Use it wherever a loss goes: as the optimizer's ``value_fn`` (Hutchinson's
  estimator then takes its products from it: the forward difference costs
  one gradient more than the step's own, which XLA shares when both sit in
  one jitted function, the central two), or in the analysis
  (:func:`curvature_operator`, :func:`hessian_eigenvalues`, ...).

  Args:
    loss_fn: the loss, ``params -> scalar`` (``(params, batch) -> scalar``
      with a batch or inside a :class:`DatasetLoss`).
    method: ``"central"`` (two gradients a product, the more accurate) or
      ``"forward"`` (one gradient a product beside the gradient at
      :math:`\theta`).
    step: :math:`h_0`, or None for the default above.

  Returns:
    A :class:`FiniteDifference`: callable ``params -> loss``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = aho.finite_difference(lambda w: jnp.sum(w ** 4) / 4)
    >>> op = aho.curvature_operator(loss, jnp.array([1.0, 2.0]))
    >>> print(*(f"{v:.3f}" for v in op.matvec(jnp.ones(2))))   # 3 w^2
    3.000 12.000
  """
  if not callable(loss_fn):
    raise TypeError(
        "finite_difference: loss_fn must be a callable params -> scalar "
        f"loss, got {type(loss_fn).__name__}")
  if method not in _METHODS:
    raise ValueError(
        f"finite_difference: method must be one of {list(_METHODS)}, got "
        f"{method!r}")
  if step is not None and (isinstance(step, bool)
                           or not isinstance(step, (int, float))
                           or not 0 < step < 1):
    raise ValueError(
        f"finite_difference: step must be a number in (0, 1) or None, got "
        f"{step!r}")
  return FiniteDifference(loss_fn, method,
                          None if step is None else float(step))
