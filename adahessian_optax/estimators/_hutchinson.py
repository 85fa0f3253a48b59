"""Hutchinson's estimator of the Hessian diagonal, configured once.

Its configuration is a :class:`Hutchinson` (probes per estimate, their
distribution, the named axis); the key lives in the estimator's state (see
:mod:`adahessian_optax.estimators._base`). The products come from the loss's
curvature kind: the Hessian for a plain closure (forward-over-reverse), a
finite-difference product for :func:`finite_difference`, the sub-batch's for
:func:`sub_batch_value_fn`.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import optax

from adahessian_optax import _checks
from adahessian_optax import _probes
from adahessian_optax import _tree
from adahessian_optax.estimators import _base
from adahessian_optax.operators import _base as _operators
from adahessian_optax.operators import _curvature


def _times(z: list, hz: list) -> list:
  """z * (H z) per leaf, in at least float32."""
  return [a * b for a, b in zip(_tree.widen(z), _tree.widen(hz))]


def _mean_of_products(zs: list, hzs: list) -> list:
  """mean_s z_s * (H z_s) per leaf; summed probe by probe (a reduce over a
  stacked probe axis was 20x slower than adds on XLA:CPU)."""
  total = _times(zs[0], hzs[0])
  for z, hz in zip(zs[1:], hzs[1:]):
    total = [a + b for a, b in zip(total, _times(z, hz))]
  return [t / len(zs) for t in total]


@dataclasses.dataclass(frozen=True)
class Hutchinson(_base.Estimator):
  """Hutchinson's estimator: its configuration.

  Attributes:
    n_samples: probes averaged per estimate.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    axis_name: the named axis over which estimates are averaged, or ``None``.
  """

  n_samples: int = 1
  distribution: str = "rademacher"
  axis_name: Optional[str] = None

  def estimate(self, value_fn, params, key, *, value_and_grad):
    """With ``value_and_grad`` the pass starts only once the probes are
    drawn (an optimization barrier): faster on XLA:CPU with two threads, but
    it also keeps XLA from merging the pass's gradient with a separately
    computed one, so the plain step (beside the user's own gradient) does
    without it."""
    kind = _curvature.as_curvature(value_fn)
    space = _operators.Space.of(params)
    zs = _probes.SAMPLERS[self.distribution](key, space.select(params),
                                             self.n_samples)
    if value_and_grad:
      zs, params = jax.lax.optimization_barrier((zs, params))
    value, grad, diagonal = kind.products(params, space, zs,
                                          _mean_of_products,
                                          axis_name=self.axis_name)
    value, grad, diagonal = _curvature.axis_mean((value, grad, diagonal),
                                                 self.axis_name)
    return _base.Estimate(value, space.replace(_zeros(params), grad),
                          space.replace(_zeros(params), diagonal))


def _zeros(params: Any) -> Any:
  return jax.tree.map(lambda x: jax.numpy.zeros_like(x), params)


def _configured(n_samples: Any, distribution: str,
                axis_name: Optional[str]) -> Hutchinson:
  _probes.check_distribution(distribution)
  return Hutchinson(_base.check_n_samples(n_samples), distribution,
                    _base.check_axis_name(axis_name))


def hutchinson_diagonal(
    value_fn: Callable[[Any], jax.Array],
    params: Any,
    key: Any,
    *,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
) -> _base.Estimate:
  r"""Estimates the Hessian diagonal with Hutchinson probes.

  For probes :math:`z_1, \dots, z_S` with independent entries of zero mean and
  unit variance (Rademacher :math:`\pm 1` by default),

  .. math::
    \widehat{\mathrm{diag}}(H) = \frac{1}{S} \sum_{s=1}^{S} z_s \odot (H z_s),
    \qquad \mathbb{E}\,\widehat{\mathrm{diag}}(H) = \mathrm{diag}(H).

  Each product :math:`H z_s` is a forward-over-reverse pass
  ``jax.jvp(jax.grad(value_fn), (params,), (z_s,))``, which also yields the
  gradient; with ``n_samples > 1`` the primal (forward and backward) pass runs
  once (:func:`jax.linearize`) and each probe adds one tangent pass. Every
  leaf gets its own probe. Tangents are taken for the floating-point leaves of
  ``params`` only; integer and boolean leaves pass through (their gradient and
  diagonal are zeros) and ``None`` leaves are empty subtrees.

  Args:
    value_fn: the loss, a function of ``params`` returning a float scalar.
    params: the pytree at which to estimate the diagonal.
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: number of probes averaged (signed) into the estimate.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    axis_name: if given (inside ``pmap`` or ``shard_map``), the value, the
      gradient and the estimate are averaged over this named axis, whether
      ``value_fn`` is the per-device loss or already its ``pmean``; replicas
      should share the key so that they use the same probes.

  Returns:
    An :class:`Estimate` ``(value, grad, diagonal)``; ``diagonal`` is
    signed (take its absolute value for AdaHessian).

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p ** 2)
    >>> result = aho.hutchinson_diagonal(loss, jnp.ones(3), key=0)
    >>> print(result.diagonal)
    [2. 4. 6.]

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines
    <https://doi.org/10.1080/03610918908812806>`_, 1989.

    Bekas, Kokiopoulou and Saad, `An estimator for the diagonal of a matrix
    <https://doi.org/10.1016/j.apnum.2007.01.003>`_, 2007.
  """
  _checks.check_params("hutchinson_diagonal", params)
  value_fn = _checks.check_value_fn(value_fn, None, "hutchinson_diagonal")
  state = _base.EstimatorState(
      _probes.key_data(key, "hutchinson_diagonal"),
      _configured(n_samples, distribution, axis_name))
  return _base.next_estimate(state, value_fn, params, value_and_grad=True)[0]


def hutchinson_estimator(
    key: Any = None,
    *,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Hutchinson's Hessian-diagonal estimator, configured once.

  The estimator that :func:`scale_by_adahessian` takes as ``estimator=``, and
  a gradient transformation in its own right: its ``init`` returns a
  :class:`EstimatorState` that holds the key and this configuration, and its
  ``update(updates, state, params, *, value_fn)`` ignores ``updates`` and
  returns the signed estimate
  :math:`\frac{1}{S}\sum_s z_s \odot (H z_s)` (see
  :func:`hutchinson_diagonal`) cast to the params' dtypes, splitting its key
  on every call. It follows the protocol of the ``hessian_diagonal_fn``
  argument of :func:`optax.contrib.sophia`, which passes the loss closure as
  ``obj_fn``; ``value_fn`` is accepted as the same thing.

  Args:
    key: an int seed or a JAX PRNG key (required).
    n_samples: number of probes per estimate.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    axis_name: named axis over which estimates are averaged.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> tx = optax.contrib.sophia(
    ...     1e-1, hessian_diagonal_fn=aho.hutchinson_estimator(key=0))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(
    ...     jax.grad(loss)(params), state, params, obj_fn=loss)
    >>> print(optax.apply_updates(params, updates))
    [0.1 0.1 0.1]

  References:
    Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023.
  """
  return _base.transformation(
      _configured(n_samples, distribution, axis_name), key,
      "hutchinson_estimator")
