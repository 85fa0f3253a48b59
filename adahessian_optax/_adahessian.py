"""The AdaHessian transformation, its optax alias and the fused step helper."""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
import optax.tree
from optax._src import numerics
from optax._src import utils

from adahessian_optax import _checks
from adahessian_optax import _compose
from adahessian_optax import _hutchinson
from adahessian_optax import _spatial
from adahessian_optax import _tree

_DEFAULT_SPATIAL = _spatial.conv_window_mean()


class ScaleByAdaHessianState(NamedTuple):
  """State of :func:`scale_by_adahessian`.

  Attributes:
    count: number of ``update`` calls (bias correction of ``mu``).
    hessian_count: number of Hessian refreshes (bias correction of ``nu``).
    nonfinite_hessian_count: number of refreshes whose estimate was not finite
      and was discarded.
    key: raw data of the probe key, split at every refresh.
    mu: EMA of the gradient.
    nu: EMA of the squared, spatially averaged absolute Hessian diagonal (at
      least float32).
  """

  count: jax.Array
  hessian_count: jax.Array
  nonfinite_hessian_count: jax.Array
  key: jax.Array
  mu: optax.Updates
  nu: optax.Updates


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HessianEstimate:
  r"""A Hutchinson estimate for one refresh, made by :func:`value_grad_and_hessian`.

  Pass it as ``tx.update(grads, state, params, hessian=estimate)``; the
  transformation checks that it was made with its own ``n_samples``,
  ``distribution`` and ``axis_name``.

  Attributes:
    diagonal: the signed estimate :math:`\frac1S\sum_s z_s \odot H z_s`, a
      pytree like params (at least float32).
    n_samples: probes averaged into ``diagonal``.
    distribution: the probes' distribution.
    axis_name: the named axis the estimate was averaged over, or ``None``.
  """

  diagonal: Any
  n_samples: int = dataclasses.field(metadata={"static": True}, default=1)
  distribution: str = dataclasses.field(metadata={"static": True},
                                        default="rademacher")
  axis_name: Optional[str] = dataclasses.field(metadata={"static": True},
                                               default=None)


def _as_float(count: jax.Array, moments: list) -> jax.Array:
  """Casts a step count for `decay ** count` in the moments' widest dtype."""
  wide = any(jnp.dtype(m.dtype).itemsize > 4 for m in moments)
  return count.astype(jnp.float64 if wide else jnp.float32)


def _check_hyperparameters(b1, b2, eps, hessian_power, update_interval,
                           n_samples):
  _checks.check_decay_precision("b1", b1)
  _checks.check_decay_precision("b2", b2)
  _checks.check_interval("b1", b1, 0.0, 1.0, high_open=True)
  _checks.check_interval("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_interval("eps", eps, 0.0, float("inf"), low_open=True,
                         high_open=True)
  _checks.check_interval("hessian_power", hessian_power, 0.0, 1.0)
  _checks.check_positive_int("update_interval", update_interval,
                             allow_traced=True)
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)


def scale_by_adahessian(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-4,
    hessian_power: jax.typing.ArrayLike = 1.0,
    *,
    key: Any = None,
    spatial_averaging: _spatial.SpatialAveraging = _DEFAULT_SPATIAL,
    update_interval: Union[int, jax.Array] = 1,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with AdaHessian's Hessian-diagonal preconditioner.

  With gradient :math:`g_t` and a Hutchinson estimate of the Hessian diagonal
  (:func:`hutchinson_diagonal`), spatially averaged per leaf after taking
  absolute values, :math:`D_t = \mathrm{avg}(|\frac1S \sum_s z_s \odot H z_s|)`:

  .. math::
    \begin{align*}
      m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, &
      \hat m_t &= m_t / (1 - \beta_1^{t}), \\
      v_r &= \beta_2 v_{r-1} + (1 - \beta_2) D_t^2, &
      \hat v_r &= v_r / (1 - \beta_2^{r}), \\
      u_t &= \hat m_t / (\hat v_r^{k/2} + \epsilon),
    \end{align*}

  where :math:`k` is ``hessian_power`` and :math:`r` counts Hessian refreshes.
  With ``update_interval`` :math:`= i`, the Hessian-vector product runs only on
  the steps where :math:`t \bmod i = 0` (counting from 0); between refreshes
  :math:`v` is not updated, and its bias correction counts refreshes, not
  steps, so :math:`\hat v` is always an unbiased average of the estimates
  taken. The state holds Adam's two buffers (``mu``, ``nu``) and O(1) more.

  The step on which the Hessian is refreshed is decided as follows: if
  ``update`` gets ``hessian_refresh=True`` or ``False`` (a Python bool), that
  decides it at trace time, and the step compiles without the
  Hessian-vector product when False (the fast way to use
  ``update_interval > 1``: jit the step with ``hessian_refresh`` static and
  pass ``step % update_interval == 0``); a boolean scalar array decides it at
  run time with :func:`jax.lax.cond` (for loops inside ``lax.scan`` or
  :class:`optax.MultiSteps`, see the composition guide); otherwise a static
  ``update_interval=1`` refreshes on every step, and any other interval
  selects with :func:`jax.lax.cond` at run time. Before the first refresh no
  curvature is known and the update is zero.

  ``update(updates, state, params, *, value_fn, hessian_refresh=None)`` takes
  the loss closure ``value_fn`` (``params -> scalar``; ``obj_fn`` is accepted
  as the same thing, for :func:`optax.contrib.sophia`'s protocol). The
  gradient used for :math:`m` is ``updates``; the one from the Hessian pass is
  discarded, and XLA removes the duplicate computation when both sit in one
  jitted function.

  Args:
    b1: decay rate of the gradient's EMA.
    b2: decay rate of the EMA of the squared Hessian diagonal.
    eps: added to :math:`\hat v^{k/2}`, outside the power.
    hessian_power: :math:`k \in [0, 1]`; 1 is the paper's default.
    key: an int seed or JAX PRNG key for the probes (required; the same key
      gives the same run).
    spatial_averaging: ``None`` (off), a :class:`SpatialRule`, a pytree prefix
      of params with a rule or ``None`` at each node, or a function
      ``params -> such a pytree``. The default, :func:`conv_window_mean`,
      averages Flax convolution kernels over their window and leaves other
      leaves alone.
    update_interval: refresh the Hessian estimate every this many steps.
    n_samples: Hutchinson probes per refresh (one primal pass, then one
      tangent pass per probe).
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
  _check_hyperparameters(b1, b2, eps, hessian_power, update_interval,
                         n_samples)
  _hutchinson._check_distribution(distribution)  # pylint: disable=protected-access
  n_samples = int(n_samples)  # a concrete array under inject_hyperparams
  typed_key = _hutchinson.as_key(key, "scale_by_adahessian")
  _checks.check_float_dtype("mu_dtype", mu_dtype)
  mu_dtype = utils.canonicalize_dtype(mu_dtype)
  static_interval = not isinstance(update_interval, jax.Array)

  def init_fn(params):
    _spatial.resolve_rules(spatial_averaging, params)
    split = _tree.FloatLeaves.of(params)
    leaves = split.select(params)
    mu = optax.tree.zeros_like(leaves, dtype=mu_dtype)
    nu = [jnp.zeros_like(x, dtype=_tree.at_least_float32(x.dtype))
          for x in leaves]
    return ScaleByAdaHessianState(
        count=jnp.zeros([], jnp.int32),
        hessian_count=jnp.zeros([], jnp.int32),
        nonfinite_hessian_count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(typed_key),
        mu=split.replace(optax.tree.zeros_like(params), mu),
        nu=split.replace(optax.tree.zeros_like(params), nu),
    )

  def refreshed_nu(estimate_fn, split, rules, b2, nu, hessian_count,
                   nonfinite_count, key_data):
    next_key, probe_key = _hutchinson.split_key_data(key_data)
    estimate = estimate_fn(probe_key)
    averaged = [
        jnp.abs(d) if rules[i] is None else rules[i].apply(jnp.abs(d))
        for i, d in zip(split.index, split.select(estimate))
    ]
    new_nu = optax.tree.update_moment(averaged, nu, b2, 2)
    # A non-finite estimate (or an overflow of its square) would poison nu for
    # good, and optax.apply_if_finite only inspects the incoming gradients:
    # discard such an estimate and count it instead.
    finite = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(v)) for v in new_nu] or [jnp.array(True)]))
    return (
        optax.tree.where(finite, new_nu, nu),
        jnp.where(finite, numerics.safe_increment(hessian_count),
                  hessian_count),
        jnp.where(finite, nonfinite_count,
                  numerics.safe_increment(nonfinite_count)),
        next_key,
    )

  def given_estimate(hessian, params, hessian_refresh):
    if not isinstance(hessian, HessianEstimate):
      raise TypeError(
          "hessian must be the HessianEstimate returned by "
          f"aho.value_grad_and_hessian, got {type(hessian).__name__}")
    for name, mine in (("n_samples", n_samples), ("distribution", distribution),
                       ("axis_name", axis_name)):
      theirs = getattr(hessian, name)
      if theirs != mine:
        raise ValueError(
            f"hessian was estimated with {name}={theirs!r}, but this "
            f"scale_by_adahessian has {name}={mine!r}; pass {name}={mine!r} "
            "to value_grad_and_hessian")
    if hessian_refresh is False or isinstance(hessian_refresh, jax.Array):
      raise ValueError(
          "update got hessian= (an estimate to use now) with hessian_refresh="
          f"{hessian_refresh!r}; a step that is given an estimate refreshes, "
          "so pass hessian_refresh=True or leave it out, and on steps without "
          "a refresh pass no hessian")
    diagonal = hessian.diagonal
    if _compose.has_masked_node(params):
      diagonal = _compose.mask_like(params, diagonal)
    _tree.check_same_structure(
        params, diagonal, "hessian.diagonal",
        "; estimate it at the params given to update")
    return lambda probe_key: diagonal

  def update_fn(updates, state, params=None, *, value_fn=None, obj_fn=None,
                hessian_refresh=None, hessian=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "scale_by_adahessian.update needs params (the loss closure is "
          "evaluated at them), got None")
    if hessian is not None:
      estimate_fn = given_estimate(hessian, params, hessian_refresh)
      hessian_refresh = True
    elif hessian_refresh is not False:
      fn = _checks.check_value_fn(value_fn, obj_fn,
                                  "scale_by_adahessian.update")
      estimate_fn = lambda probe_key: _hutchinson.estimate(
          fn, params, probe_key, n_samples=n_samples,
          distribution=distribution, axis_name=axis_name,
          probes_first=False).diagonal
    else:
      estimate_fn = None  # no refresh: the loss closure is not needed
    _tree.check_same_structure(params, updates, "updates")
    _tree.check_same_structure(
        params, state.mu, "the state's mu",
        "; was the state initialised with init() on params like these?")
    traced_refresh = isinstance(hessian_refresh, jax.Array)
    if traced_refresh and (hessian_refresh.shape != ()
                           or hessian_refresh.dtype != jnp.bool_):
      raise TypeError(
          "hessian_refresh given as an array must be a boolean scalar, got "
          f"shape {hessian_refresh.shape} and dtype {hessian_refresh.dtype}")
    if not (hessian_refresh is None or traced_refresh
            or isinstance(hessian_refresh, bool)):
      raise TypeError(
          "hessian_refresh must be a Python bool (static under jit), a boolean "
          f"scalar array or None, got {type(hessian_refresh).__name__}")
    rules = _spatial.resolve_rules(spatial_averaging, params)

    split = _tree.FloatLeaves.of(params)
    grads = split.select(updates)
    nu = split.select(state.nu)
    operands = (nu, state.hessian_count, state.nonfinite_hessian_count,
                state.key)
    # Hyperparameters as arrays of the params' widest dtype, as
    # optax.inject_hyperparams passes them, so both give identical numbers.
    hp_dtype = _as_float(state.count, nu).dtype
    b1_, b2_, eps_, power_ = (jnp.asarray(h, hp_dtype)
                              for h in (b1, b2, eps, hessian_power))
    refresh = lambda *ops: refreshed_nu(estimate_fn, split, rules, b2_,
                                        *ops)
    if hessian_refresh is None and static_interval and update_interval == 1:
      hessian_refresh = True
    if hessian_refresh is True:
      nu, hessian_count, nonfinite_count, key_data = refresh(*operands)
    elif hessian_refresh is False:
      nu, hessian_count, nonfinite_count, key_data = operands
    elif traced_refresh:
      nu, hessian_count, nonfinite_count, key_data = jax.lax.cond(
          hessian_refresh, refresh, lambda *ops: ops, *operands)
    else:
      nu, hessian_count, nonfinite_count, key_data = jax.lax.cond(
          state.count % update_interval == 0, refresh, lambda *ops: ops,
          *operands)

    old_mu = split.select(state.mu)
    # The EMA runs in at least float32 (the hyperparameters' dtype), so that
    # low-precision params stay strict-clean; it is stored in mu_dtype.
    wide_mu = [m.astype(_tree.at_least_float32(m.dtype)) for m in old_mu]
    mu = optax.tree.update_moment(
        optax.tree.cast_like(grads, wide_mu), wide_mu, b1_, 1)
    count_inc = numerics.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1_, _as_float(count_inc, mu))
    nu_hat = optax.tree.bias_correction(
        nu, b2_, _as_float(jnp.maximum(hessian_count, 1), nu))

    def precondition(m, v, g):
      u = m.astype(v.dtype) / (jnp.power(v, power_ / 2) + eps_)
      u = jnp.where(hessian_count > 0, u, 0)
      return u.astype(g.dtype)

    new_updates = jax.tree.map(precondition, mu_hat, nu_hat, grads)
    return split.replace(updates, new_updates), ScaleByAdaHessianState(
        count=count_inc,
        hessian_count=hessian_count,
        nonfinite_hessian_count=nonfinite_count,
        key=key_data,
        mu=split.replace(state.mu, optax.tree.cast_like(mu, old_mu)),
        nu=split.replace(state.nu,
                         optax.tree.cast_like(nu, split.select(state.nu))),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adahessian(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-4,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    hessian_power: jax.typing.ArrayLike = 1.0,
    *,
    key: Any = None,
    spatial_averaging: _spatial.SpatialAveraging = _DEFAULT_SPATIAL,
    update_interval: Union[int, jax.Array] = 1,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The AdaHessian optimizer, with decoupled weight decay.

  :func:`scale_by_adahessian` followed by decoupled weight decay scaled by the
  learning rate, as in every reference implementation:

  .. math::
    \theta_t = \theta_{t-1} - \eta_t \left(
      \frac{\hat m_t}{\hat v_r^{k/2} + \epsilon} + \lambda \theta_{t-1}\right)

  It is ``optax.chain(scale_by_adahessian(...),
  optax.add_decayed_weights(weight_decay, weight_decay_mask),
  optax.scale_by_learning_rate(learning_rate))``. Call ``update`` with the
  loss closure: ``tx.update(grads, state, params, value_fn=loss_of_params)``.

  Args:
    learning_rate: a scalar or an optax schedule. The paper used 0.15 for
      image classification.
    b1: decay rate of the gradient's EMA.
    b2: decay rate of the EMA of the squared Hessian diagonal.
    eps: added to :math:`\hat v^{k/2}`, outside the power.
    weight_decay: decoupled weight decay :math:`\lambda` (or a schedule).
    weight_decay_mask: a pytree of bools like params, or a function of params
      returning one, selecting the leaves to decay.
    hessian_power: :math:`k \in [0, 1]`.
    key: an int seed or JAX PRNG key for the probes (required).
    spatial_averaging: per-leaf averaging rules, see
      :func:`scale_by_adahessian`.
    update_interval: refresh the Hessian estimate every this many steps.
    n_samples: Hutchinson probes per refresh.
    distribution: ``"rademacher"`` or ``"gaussian"`` probes.
    axis_name: named axis over which the estimate is averaged.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 1e4]) * (p - 1.0) ** 2)
    >>> tx = aho.adahessian(learning_rate=0.5, key=0)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params, value_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> print(jnp.round(params, 3))
    [1. 1.]

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  return optax.chain(
      scale_by_adahessian(
          b1=b1, b2=b2, eps=eps, hessian_power=hessian_power, key=key,
          spatial_averaging=spatial_averaging,
          update_interval=update_interval, n_samples=n_samples,
          distribution=distribution, axis_name=axis_name, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _adahessian_state(opt_state: Any) -> ScaleByAdaHessianState:
  is_state = lambda x: isinstance(x, ScaleByAdaHessianState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state)
           if is_state(x)]
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(
        f"value_grad_and_hessian: opt_state holds {what} "
        "ScaleByAdaHessianState; pass the state of the optimizer that "
        "contains exactly one scale_by_adahessian (for several, pass the "
        "part of the state that belongs to the one being refreshed)")
  return found[0]


def value_grad_and_hessian(
    value_fn: Callable[[Any], jax.Array],
    params: Any,
    opt_state: Any,
    *,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
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

  Computing ``jax.grad`` separately and passing ``value_fn`` to ``update``
  gives the same numbers, but then the gradient is computed twice unless XLA
  merges the two copies, which it does not always do (it did not for a
  Transformer on CPU, nor across ``lax.cond``).

  The probes are those ``update`` would draw: the key comes from the
  :class:`ScaleByAdaHessianState` found in ``opt_state`` (which must hold
  exactly one), split as ``update`` splits it, so both ways give the same
  run. For ``update_interval > 1`` call this on refresh steps only and
  :func:`jax.value_and_grad` on the others (with ``hessian_refresh=False``).

  Args:
    value_fn: the loss closure, ``params -> scalar``.
    params: the params, as given to ``tx.update``.
    opt_state: the optimizer state (or the part of it that holds the
      :class:`ScaleByAdaHessianState`).
    n_samples: probes per estimate: the transformation's ``n_samples``.
    distribution: the transformation's ``distribution``.
    axis_name: the transformation's ``axis_name``; the loss, the gradient and
      the estimate are averaged over it.

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
  state = _adahessian_state(opt_state)
  value_fn = _hutchinson.check_estimate_args(
      "value_grad_and_hessian", value_fn, params, n_samples, distribution)
  # [...] also unwraps the variables of an nnx.Optimizer's state.
  _, probe_key = _hutchinson.split_key_data(jnp.asarray(state.key[...]))
  result = _hutchinson.estimate(
      value_fn, params, probe_key, n_samples=n_samples,
      distribution=distribution, axis_name=axis_name, probes_first=True)
  estimate = HessianEstimate(result.diagonal, n_samples=n_samples,
                             distribution=distribution, axis_name=axis_name)
  return result.value, result.grad, estimate
