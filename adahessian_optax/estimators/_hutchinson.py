"""Hutchinson's estimator of the Hessian diagonal, configured once.

The estimator's configuration (``n_samples``, ``distribution``,
``axis_name``) lives in its state, :class:`HutchinsonState`, beside the key,
as static fields. Every verb (the plain and the fused AdaHessian step,
Sophia's ``hessian_diagonal_fn``, :func:`hutchinson_diagonal`) reads it from
there and advances the key in one place, :func:`estimate`.

The protocol of AdaHessian's ``estimator=`` and of the fused step is here
too: an estimator's state is an :class:`EstimatorState`, which makes its own
estimate (:meth:`EstimatorState.estimate`); :class:`HutchinsonState` and the
Gauss-Newton-Bartlett estimator's ``GNBState`` are the two kinds.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import optax.tree

from adahessian_optax import _checks
from adahessian_optax.operators import _curvature
from adahessian_optax import _probes
from adahessian_optax import _tree
from adahessian_optax import _xla_cpu


class EstimatorState:
  """The state of a Hessian-diagonal estimator, as ``estimator=`` takes it.

  A subclass is a registered pytree dataclass whose only array is its key
  and whose configuration is static, and it makes its own estimate, so that
  AdaHessian's plain and fused steps need not know which estimator they
  hold.
  """

  def estimate(self, value_fn: Callable[[Any], jax.Array], params: Any, *,
               fused: bool) -> tuple[Any, "EstimatorState"]:
    """`((value, grad, diagonal), next state)` at `params`.

    With `fused`, the result's value and gradient are those of
    :func:`value_grad_and_hessian` (one pass with the diagonal); without,
    only ``diagonal`` is used (the caller has its own gradient) and the
    estimator may skip the rest.
    """
    raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HutchinsonState(EstimatorState):
  """State of a Hutchinson estimator: its key and its configuration.

  Only ``key`` is an array; the configuration is static (part of the pytree
  structure), so it cannot be traced or changed by a checkpoint.

  Attributes:
    key: raw ``uint32`` data of the probe key, split at every estimate.
    n_samples: probes averaged per estimate.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    axis_name: the named axis over which estimates are averaged, or ``None``.
  """

  key: jax.Array
  n_samples: int = dataclasses.field(default=1, metadata={"static": True})
  distribution: str = dataclasses.field(default="rademacher",
                                        metadata={"static": True})
  axis_name: Optional[str] = dataclasses.field(default=None,
                                               metadata={"static": True})

  def estimate(self, value_fn, params, *, fused):
    return estimate(value_fn, params, self, barrier=fused)


def register_with_flax_serialization(cls: type) -> None:
  """Registers an estimator state whose only array is `key` with Flax."""
  # flax.serialization (msgpack) keeps unregistered classes as opaque leaves;
  # registered, the state is saved as {"key": ...}, as a NamedTuple would be.
  try:
    from flax import serialization  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  serialization.register_serialization_state(
      cls,
      lambda s: {"key": serialization.to_state_dict(s.key)},
      lambda s, d: dataclasses.replace(
          s, key=serialization.from_state_dict(s.key, d["key"])))


register_with_flax_serialization(HutchinsonState)


def init_state(key: Any, *, n_samples: Any = 1,
               distribution: str = "rademacher",
               axis_name: Optional[str] = None,
               owner: str = "hutchinson_estimator") -> HutchinsonState:
  """A checked :class:`HutchinsonState`."""
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  _probes.check_distribution(distribution)
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"axis_name must be a str or None, got {axis_name!r}")
  return HutchinsonState(_probes.key_data(key, owner), int(n_samples),
                         distribution, axis_name)


class HutchinsonResult(NamedTuple):
  """What one Hutchinson pass returns.

  Attributes:
    value: the loss at `params`.
    grad: its gradient, a pytree like `params`.
    diagonal: the signed estimate mean_s z_s * (H z_s) of the Hessian diagonal,
      in at least float32.
  """

  value: jax.Array
  grad: Any
  diagonal: Any


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


def estimate(value_fn: Callable[[Any], jax.Array], params: Any,
             state: HutchinsonState, *,
             barrier: bool = False) -> tuple[HutchinsonResult, HutchinsonState]:
  """One estimate and the advanced state: the only place the key is split.

  With `barrier`, the Hessian pass starts only once the probes are drawn (an
  optimization barrier): faster on XLA:CPU with two threads, but it also
  keeps XLA from merging the pass's gradient with a separately computed one,
  so the paths that run beside the user's own gradient do without it.
  """
  next_key, probe_key = _probes.split(jnp.asarray(state.key[...]))
  split = _tree.FloatLeaves.of(params)
  leaves = split.select(params)
  zs = _probes.SAMPLERS[state.distribution](probe_key, leaves,
                                            state.n_samples)
  if barrier:
    zs, params = jax.lax.optimization_barrier((zs, params))
  value, grad, diagonal = _curvature.products(
      value_fn, params, zs, _mean_of_products, axis_name=state.axis_name)
  value, grad, diagonal = _curvature.axis_mean((value, grad, diagonal),
                                               state.axis_name)
  zeros = jax.tree.map(jnp.zeros_like, params)
  result = HutchinsonResult(value=value, grad=split.replace(zeros, grad),
                            diagonal=split.replace(zeros, diagonal))
  return result, dataclasses.replace(state, key=next_key)


def hutchinson_diagonal(
    value_fn: Callable[[Any], jax.Array],
    params: Any,
    key: Any,
    *,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
) -> HutchinsonResult:
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
    A :class:`HutchinsonResult` ``(value, grad, diagonal)``; ``diagonal`` is
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
  state = init_state(key, n_samples=n_samples, distribution=distribution,
                     axis_name=axis_name, owner="hutchinson_diagonal")
  return estimate(value_fn, params, state, barrier=True)[0]


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
  :class:`HutchinsonState` that holds the key and this configuration, and its
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
  return as_transformation(
      init_state(key, n_samples=n_samples, distribution=distribution,
                 axis_name=axis_name), "hutchinson_estimator")


def as_transformation(initial: EstimatorState,
                      owner: str) -> optax.GradientTransformationExtraArgs:
  """An estimator as a gradient transformation: ``init`` returns `initial`;
  ``update(updates, state, params, *, value_fn)`` ignores ``updates`` and
  returns the estimate cast to the params' dtypes, and the next state.

  The estimate is traced through `_xla_cpu.call`, so that it runs at full
  speed inside a caller's control flow on XLA:CPU (Sophia's ``lax.cond``).
  """

  def init_fn(params):
    del params
    return initial

  def update_fn(updates, state, params=None, *, value_fn=None, obj_fn=None,
                **extra_args):
    del updates, extra_args
    _checks.check_params(f"{owner}.update", params)
    fn = _checks.check_value_fn(value_fn, obj_fn, f"{owner}.update")

    def diagonal_and_state(state, params):
      result, state = state.estimate(fn, params, fused=False)
      return result.diagonal, state
    diagonal, state = _xla_cpu.call(diagonal_and_state, state, params)
    return optax.tree.cast_like(diagonal, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HessianEstimate:
  r"""A Hessian-diagonal estimate made by :func:`value_grad_and_hessian`.

  Pass it as ``tx.update(grads, state, params, hessian=estimate)``: the
  transformation takes the diagonal and the advanced estimator state from it,
  so the fused and the plain step draw the same probes (or labels).

  Attributes:
    diagonal: the estimate, a pytree like params (at least float32): the
      signed Hutchinson estimate :math:`\frac1S\sum_s z_s \odot H z_s`, or
      the Gauss-Newton-Bartlett estimate of the GGN diagonal
      (:func:`gnb_diagonal`).
    estimator: the estimator's state after this estimate
      (:class:`HutchinsonState` or :class:`GNBState`).
  """

  diagonal: Any
  estimator: EstimatorState


def _is_state(x: Any) -> bool:
  return isinstance(x, EstimatorState)


def find_state(opt_state: Any, owner: str) -> EstimatorState:
  """The one estimator state (of any kind) in `opt_state`."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state)
           if _is_state(x)]
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(
        f"{owner}: opt_state holds {what} HutchinsonState or GNBState (the "
        "state of a Hessian-diagonal estimator); pass the state of an "
        "optimizer with exactly one AdaHessian (for several, pass the part of "
        "the state that belongs to the one being refreshed)")
  return found[0]


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

  The estimator is the optimizer's own: its :class:`HutchinsonState` (key,
  ``n_samples``, ``distribution``, ``axis_name``) is read from ``opt_state``,
  which must hold exactly one, and the estimate carries the advanced state
  back to ``update``, so the fused and the plain call
  (``update(..., value_fn=...)``) give the same run. With a
  Gauss-Newton-Bartlett estimator (:func:`gnb_estimator`, state
  :class:`GNBState`) ``value_fn`` is an :func:`ggn` loss and the pass is
  one forward pass and the backward passes of the true and the sampled
  labels (:func:`gnb_diagonal`); no second derivative. Calling this function
  is a refresh: with ``update_interval=1`` call it on every step; to refresh
  every ``k`` steps construct the optimizer with ``update_interval=None``
  and call it on the refresh steps only, using :func:`jax.value_and_grad`
  and ``update(..., hessian_refresh=False)`` on the others (the delayed
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
  state = find_state(opt_state, "value_grad_and_hessian")
  _checks.check_params("value_grad_and_hessian", params)
  value_fn = _checks.check_value_fn(value_fn, None, "value_grad_and_hessian")
  result, state = state.estimate(value_fn, params, fused=True)
  return result.value, result.grad, HessianEstimate(result.diagonal, state)
