"""The AdaHessian transformation and its optax alias."""

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
import optax.tree

from adahessian_optax import _checks
from adahessian_optax import _tree
from adahessian_optax.optimizer import _layouts
from adahessian_optax.optimizer import _refresh
from adahessian_optax.optimizer import _spatial

DEFAULT_SPATIAL = _layouts.default_rules


class ScaleByAdaHessianState(NamedTuple):
  """State of :func:`scale_by_adahessian`.

  Attributes:
    count: number of ``update`` calls (bias correction of ``mu``).
    hessian_count: number of Hessian refreshes (bias correction of ``nu``).
    nonfinite_hessian_count: number of refreshes whose estimate was not finite
      and was discarded.
    estimator: the estimator's state: for this library's estimators an
      :class:`EstimatorState` (the key, split at every refresh, and the
      configuration as static structure).
    mu: EMA of the gradient.
    nu: EMA of the squared, spatially averaged absolute Hessian diagonal (at
      least float32).
  """

  count: jax.Array
  hessian_count: jax.Array
  nonfinite_hessian_count: jax.Array
  estimator: Any
  mu: optax.Updates
  nu: optax.Updates


def _check_hyperparameters(b1, b2, eps, hessian_power, update_interval):
  _checks.check_decay_precision("b1", b1)
  _checks.check_decay_precision("b2", b2)
  _checks.check_interval("b1", b1, 0.0, 1.0, high_open=True)
  _checks.check_interval("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_interval("eps", eps, 0.0, float("inf"), low_open=True,
                         high_open=True)
  _checks.check_interval("hessian_power", hessian_power, 0.0, 1.0)
  if update_interval is not None:
    _checks.check_positive_int("update_interval", update_interval,
                               allow_traced=True)


def _as_float(count: jax.Array, moments: list) -> jax.Array:
  """Casts a step count for `decay ** count` in the moments' widest dtype."""
  wide = any(jnp.dtype(m.dtype).itemsize > 4 for m in moments)
  return count.astype(jnp.float64 if wide else jnp.float32)


def _first_moment(grads: list, old_mu: list, b1) -> list:
  """The gradient's EMA, in at least float32 (the hyperparameters' dtype).

  So that low-precision params stay strict-clean; it is stored in mu_dtype.
  """
  wide = _tree.widen(old_mu)
  return optax.tree.update_moment(optax.tree.cast_like(grads, wide), wide,
                                  b1, 1)


def _preconditioned(mu, curvature, grads, count, b1, b2, power, eps):
  """`mu_hat / (nu_hat^(power/2) + eps)` per leaf, zero before a refresh.

  A non-finite first moment (a NaN or an infinite gradient, from bad params
  or a bad batch) gives a NaN update, before the first refresh too, as
  `optax.adam` does: a bad gradient is never turned into a zero update,
  which would stall training silently. (`optax.apply_if_finite` skips such
  steps instead.)
  """
  mu_hat = optax.tree.bias_correction(mu, b1, _as_float(count, mu))
  refreshes = curvature.hessian_count
  nu_hat = optax.tree.bias_correction(
      curvature.nu, b2, _as_float(jnp.maximum(refreshes, 1), curvature.nu))

  def one(m, v, g):
    u = m.astype(v.dtype) / (jnp.power(v, power / 2) + eps)
    before = jnp.where(jnp.isfinite(m), 0, jnp.nan).astype(v.dtype)
    return jnp.where(refreshes > 0, u, before).astype(g.dtype)
  return jax.tree.map(one, mu_hat, nu_hat, grads)


def _check_update_inputs(updates, state, params):
  if params is None:
    raise ValueError(
        "scale_by_adahessian.update needs params (the loss closure is "
        "evaluated at them), got None")
  _tree.check_same_structure(params, updates, "updates")
  _tree.check_same_structure(
      params, state.mu, "the state's mu",
      "; was the state initialised with init() on params like these?")


def scale_by_adahessian(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-4,
    hessian_power: jax.typing.ArrayLike = 1.0,
    *,
    key: Any = None,
    estimator: Optional[optax.GradientTransformationExtraArgs] = None,
    spatial_averaging: _spatial.SpatialAveraging = DEFAULT_SPATIAL,
    update_interval: Union[int, jax.Array, None] = 1,
    n_samples: Optional[int] = None,
    distribution: Optional[str] = None,
    axis_name: Optional[str] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with AdaHessian's Hessian-diagonal preconditioner.

  With gradient :math:`g_t` and a Hutchinson estimate of the Hessian diagonal
  (:func:`hutchinson_diagonal`), spatially averaged per leaf after taking
  absolute values, :math:`D_t = \mathrm{avg}(|\frac1S \sum_s z_s \odot H z_s|)`
  (or, with ``estimator=aho.gnb_estimator(...)``, of the never-negative
  Gauss-Newton-Bartlett estimate of the GGN diagonal, :func:`gnb_diagonal`):

  .. math::
    \begin{align*}
      m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, &
      \hat m_t &= m_t / (1 - \beta_1^{t}), \\
      v_r &= \beta_2 v_{r-1} + (1 - \beta_2) D_t^2, &
      \hat v_r &= v_r / (1 - \beta_2^{r}), \\
      u_t &= \hat m_t / (\hat v_r^{k/2} + \epsilon),
    \end{align*}

  where :math:`k` is ``hessian_power`` and :math:`r` counts Hessian refreshes.
  Between refreshes :math:`v` is not updated, and its bias correction counts
  refreshes, not steps, so :math:`\hat v` is always an unbiased average of
  the estimates taken. Before the first refresh no curvature is known and the
  update is zero. The state holds Adam's two buffers (``mu``, ``nu``) and
  O(1) more.

  **When the Hessian is refreshed** (one rule): with ``update_interval``
  :math:`= i` (an int) on the steps whose count :math:`t` (from 0) has
  :math:`t \bmod i = 0`; with ``update_interval=None`` on the steps where the
  call says so, by ``hessian_refresh=True`` or by passing an estimate
  (``hessian=``). A Python bool decided at trace time compiles one program,
  without the Hessian-vector product when no refresh is due; a decision known
  only at run time (``update_interval > 1``, or an array ``hessian_refresh``)
  skips the product with :func:`jax.lax.cond` (on XLA:CPU with the
  convolutions of the refresh branch rewritten into the layout that runs
  fast inside a branch).
  Contradictory inputs are errors: ``hessian_refresh`` with an int
  ``update_interval``, an estimate with ``hessian_refresh=False``, or an
  estimate on a step whose refresh is decided at run time.

  ``update(updates, state, params, *, value_fn=None, hessian_refresh=None,
  hessian=None)`` takes the loss closure ``value_fn`` (``params -> scalar``;
  ``obj_fn`` is accepted as the same thing, for
  :func:`optax.contrib.sophia`'s protocol), or the estimate ``hessian`` of
  :func:`value_grad_and_hessian` (the fused step); neither is needed on a
  step known not to refresh. With ``value_fn``, the gradient used for
  :math:`m` is ``updates``; the one from the Hessian pass is discarded, and
  XLA removes the duplicate computation when both sit in one jitted function.

  Args:
    b1: decay rate of the gradient's EMA.
    b2: decay rate of the EMA of the squared Hessian diagonal.
    eps: added to :math:`\hat v^{k/2}`, outside the power.
    hessian_power: :math:`k \in [0, 1]`; 1 is the paper's default.
    key: an int seed or JAX PRNG key for the probes: short for
      ``estimator=aho.hutchinson_estimator(key, ...)``. The same key gives
      the same run.
    estimator: the curvature-diagonal estimator: Hutchinson's,
      :func:`hutchinson_estimator`, which holds the key, ``n_samples``,
      ``distribution`` and ``axis_name``; the Gauss-Newton-Bartlett
      estimator of the GGN diagonal, :func:`gnb_estimator` (then
      ``value_fn`` is an :func:`ggn` loss); or any
      :class:`optax.GradientTransformationExtraArgs` whose
      ``update(updates, state, params, *, value_fn)`` returns the estimate
      (the contract of :func:`optax.contrib.sophia`'s
      ``hessian_diagonal_fn``; the fused step needs this library's). Give
      either this or ``key`` (and those three).
    spatial_averaging: ``None`` (off), a :class:`SpatialRule`, a pytree prefix
      of params with a rule or ``None`` at each node, or a function
      ``params -> such a pytree``. The default, :func:`conv_window_mean`,
      averages Flax convolution kernels over their window and leaves other
      leaves alone.
    update_interval: refresh the Hessian estimate every this many steps, or
      ``None`` to decide on each call.
    n_samples: Hutchinson probes per refresh (default 1; one primal pass,
      then one tangent pass per probe).
    distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes.
    axis_name: inside ``pmap``/``shard_map``, the name of the data axis over
      which the estimate is averaged, so replicas stay identical.
      ``value_fn`` may be the per-device loss or its ``pmean``; the gradient
      passed as ``updates`` must already be the mean (see the distributed
      training guide).
    mu_dtype: optional dtype of ``mu``; by default the params' dtype.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 100.0]) * p ** 2)
    >>> tx = optax.chain(aho.scale_by_adahessian(key=0), optax.scale(-0.1))
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            value_fn=loss)
    >>> print(jnp.round(optax.apply_updates(params, updates), 4))
    [0.9 0.9]

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
  """
  _check_hyperparameters(b1, b2, eps, hessian_power, update_interval)
  estimator = _refresh.resolve_estimator(estimator, key, n_samples,
                                         distribution, axis_name)
  _checks.check_float_dtype("mu_dtype", mu_dtype)
  mu_dtype = None if mu_dtype is None else jax.dtypes.canonicalize_dtype(
      mu_dtype)

  def init_fn(params):
    _spatial.resolve_rules(spatial_averaging, params)
    estimator_state = estimator.init(params)
    split = _tree.FloatLeaves.of(params)
    leaves = split.select(params)
    nu = [jnp.zeros_like(x, dtype=_tree.at_least_float32(x.dtype))
          for x in leaves]
    zeros = optax.tree.zeros_like(params)
    return ScaleByAdaHessianState(
        count=jnp.zeros([], jnp.int32),
        hessian_count=jnp.zeros([], jnp.int32),
        nonfinite_hessian_count=jnp.zeros([], jnp.int32),
        estimator=estimator_state,
        mu=split.replace(zeros, optax.tree.zeros_like(leaves, dtype=mu_dtype)),
        nu=split.replace(zeros, nu),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, obj_fn=None,
                hessian_refresh=None, hessian=None, **extra_args):
    del extra_args
    _check_update_inputs(updates, state, params)
    refresh = _refresh.refresh_predicate(update_interval, state.count,
                                         hessian_refresh, hessian)
    split = _tree.FloatLeaves.of(params)
    # Hyperparameters as arrays of the params' widest dtype, as
    # optax.inject_hyperparams passes them, so both give identical numbers.
    hp_dtype = _as_float(state.count, split.select(state.nu)).dtype
    b1_, b2_, eps_, power_ = (jnp.asarray(h, hp_dtype)
                              for h in (b1, b2, eps, hessian_power))

    curvature = _refresh.Curvature(split.select(state.nu),
                                   state.hessian_count,
                                   state.nonfinite_hessian_count,
                                   state.estimator)
    if refresh is not False:
      estimate_fn = _refresh.estimate_fn(params, value_fn, obj_fn, hessian,
                                         estimator, state.estimator)
      rules = _spatial.resolve_rules(spatial_averaging, params)
      curvature = _refresh.dispatch(
          refresh,
          lambda c: _refresh.refreshed(c, estimate_fn, split, rules, b2_),
          curvature)

    grads, old_mu = split.select(updates), split.select(state.mu)
    mu = _first_moment(grads, old_mu, b1_)
    count = optax.safe_increment(state.count)
    new_updates = _preconditioned(mu, curvature, grads, count, b1_, b2_,
                                  power_, eps_)
    # Non-float leaves (step counters, masks) are never moved, whatever
    # update came in for them.
    zeros = optax.tree.zeros_like(params)
    return split.replace(zeros, new_updates), ScaleByAdaHessianState(
        count=count,
        hessian_count=curvature.hessian_count,
        nonfinite_hessian_count=curvature.nonfinite_hessian_count,
        estimator=curvature.estimator,
        mu=split.replace(state.mu, optax.tree.cast_like(mu, old_mu)),
        nu=split.replace(state.nu, optax.tree.cast_like(
            curvature.nu, split.select(state.nu))),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
