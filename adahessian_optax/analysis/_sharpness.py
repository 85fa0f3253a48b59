r"""Sharpness during training: optimizers' preconditioners and stability.

Gradient descent with step :math:`\eta` is stable on a quadratic while the
top Hessian eigenvalue stays below :math:`2/\eta`; an adaptive method with
diagonal preconditioner :math:`P` and momentum :math:`\beta_1` while the
preconditioned sharpness :math:`\lambda_{\max}(P^{-1} H)` stays below
:math:`(2 + 2\beta_1) / ((1 - \beta_1)\eta)`. These read :math:`P` from an
optimizer's state, for ``hessian_eigenvalues(..., preconditioner=P)``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adahessian_optax.optimizer import _adahessian
from adahessian_optax import _checks


def _bias_corrected(nu: Any, b2: Any, count: jax.Array) -> Any:
  count = jnp.maximum(count, 1).astype(jnp.float32)
  return jax.tree.map(lambda v: v / (1 - jnp.asarray(b2, v.dtype) ** count),
                      nu)


def adam_preconditioner(opt_state: Any, *, b2: float = 0.999,
                        eps: float = 1e-8) -> Any:
  r"""Adam's diagonal preconditioner, read from an optimizer state.

  .. math::
    P = \sqrt{\hat v} + \epsilon, \qquad \hat v = v / (1 - \beta_2^t),

  from the one :class:`optax.ScaleByAdamState` in ``opt_state`` (``adam``,
  ``adamw``, under ``chain``, ``inject_hyperparams``, ...). Adam's step is
  :math:`-\eta\,\hat m / P`, so :math:`\lambda_{\max}(P^{-1} H)` is the
  sharpness that decides its stability.

  Args:
    opt_state: the optimizer state.
    b2: the optimizer's ``b2``.
    eps: the optimizer's ``eps``.

  Returns:
    :math:`P`, a pytree like the params, to pass as
    ``hessian_eigenvalues(..., preconditioner=P)``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> tx = optax.adam(0.1)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> _, state = tx.update(jnp.array([3.0, 4.0]), state, params)
    >>> p = aho.adam_preconditioner(state, eps=0.0)   # |g| after one step
    >>> print(*(f"{x:.3f}" for x in p))
    3.000 4.000

  References:
    Cohen et al., `Adaptive Gradient Methods at the Edge of Stability
    <https://arxiv.org/abs/2207.14484>`_, 2022.
  """
  state = _checks.find_one(opt_state, optax.ScaleByAdamState,
                           "ScaleByAdamState", "optax.adam, adamw, ...")
  _checks.check_interval("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_interval("eps", eps, 0.0, float("inf"))
  nu = _bias_corrected(state.nu, b2, state.count)
  return jax.tree.map(lambda v: jnp.sqrt(v) + eps, nu)


def adahessian_preconditioner(opt_state: Any, *, b2: float = 0.999,
                              hessian_power: float = 1.0,
                              eps: float = 1e-4) -> Any:
  r"""AdaHessian's diagonal preconditioner, read from an optimizer state.

  .. math::
    P = \hat v^{k/2} + \epsilon, \qquad \hat v = v / (1 - \beta_2^r),

  with :math:`v` the EMA of the squared (spatially averaged) Hessian
  diagonal, :math:`r` the number of Hessian refreshes and :math:`k` the
  Hessian power, from the one :class:`ScaleByAdaHessianState` in
  ``opt_state``: AdaHessian's step is :math:`-\eta\,\hat m / P`.

  Args:
    opt_state: the optimizer state.
    b2: the optimizer's ``b2``.
    hessian_power: the optimizer's ``hessian_power`` :math:`k`.
    eps: the optimizer's ``eps``.

  Returns:
    :math:`P`, a pytree like the params.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 4.0]) * p ** 2)  # H = 2, 8
    >>> tx = aho.adahessian(0.1, key=0)
    >>> params = jnp.ones(2)
    >>> state = tx.init(params)
    >>> _, state = tx.update(2 * params, state, params, value_fn=loss)
    >>> print(aho.adahessian_preconditioner(state, eps=0.0))
    [2. 8.]

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
  """
  state = _checks.find_one(opt_state, _adahessian.ScaleByAdaHessianState,
                           "ScaleByAdaHessianState", "aho.adahessian")
  _checks.check_interval("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_interval("eps", eps, 0.0, float("inf"))
  nu = _bias_corrected(state.nu, b2, state.hessian_count)
  return jax.tree.map(lambda v: jnp.power(v, hessian_power / 2) + eps, nu)


def stability_threshold(learning_rate: Any, b1: Any = 0.0) -> Any:
  r"""The sharpness above which a quadratic makes the optimizer diverge.

  .. math::
    \frac{2 + 2\beta_1}{(1 - \beta_1)\,\eta},

  for a step :math:`-\eta\, P^{-1} m` with momentum
  :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g` (Adam, AdaHessian:
  compare with the preconditioned sharpness); :math:`2/\eta` for gradient
  descent (:math:`\beta_1 = 0`), 38/η for :math:`\beta_1 = 0.9`.

  Args:
    learning_rate: :math:`\eta > 0`.
    b1: the momentum's EMA coefficient :math:`\beta_1 \in [0, 1)`.

  Returns:
    The threshold: a Python float for Python numbers, else a JAX scalar
    (a traced learning rate from a schedule works).

  Examples:
    >>> import adahessian_optax as aho
    >>> print(aho.stability_threshold(0.5), aho.stability_threshold(0.5, 0.5))
    4.0 12.0

  References:
    Cohen et al., `Gradient Descent on Neural Networks Typically Occurs at
    the Edge of Stability <https://arxiv.org/abs/2103.00065>`_, ICLR 2021.

    Cohen et al., `Adaptive Gradient Methods at the Edge of Stability
    <https://arxiv.org/abs/2207.14484>`_, 2022.
  """
  _checks.check_interval("learning_rate", learning_rate, 0.0, float("inf"),
                         low_open=True)
  _checks.check_interval("b1", b1, 0.0, 1.0, high_open=True)
  return (2 + 2 * b1) / ((1 - b1) * learning_rate)
