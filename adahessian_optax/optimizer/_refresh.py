"""When AdaHessian refreshes its curvature estimate, and how.

The one rule for when a step refreshes (:func:`refresh_predicate`), the
dispatcher that compiles the refresh in or out or selects it at run time
(:func:`dispatch`), where the estimate comes from (the loss closure through
the estimator, or an estimate given to the fused step) and what a refresh
does to the state (:func:`refreshed`).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree

from adahessian_optax import _checks
from adahessian_optax import _probes
from adahessian_optax import _tree
from adahessian_optax import _xla_cpu
from adahessian_optax.estimators import _base as _estimators
from adahessian_optax.estimators import _hutchinson
from adahessian_optax.optimizer import _compose


class Curvature(NamedTuple):
  """The part of the state that a Hessian refresh changes."""

  nu: list
  hessian_count: jax.Array
  nonfinite_hessian_count: jax.Array
  estimator: Any


def resolve_estimator(estimator, key, n_samples, distribution, axis_name):
  """The estimator, given whole or built from the 0.1 keyword arguments."""
  loose = {"key": key, "n_samples": n_samples, "distribution": distribution,
           "axis_name": axis_name}
  if estimator is None:
    _probes.key_data(key, "scale_by_adahessian")  # a missing key is named here
    return _hutchinson.hutchinson_estimator(
        key, n_samples=1 if n_samples is None else n_samples,
        distribution="rademacher" if distribution is None else distribution,
        axis_name=axis_name)
  given = sorted(name for name, value in loose.items() if value is not None)
  if given:
    raise ValueError(
        f"scale_by_adahessian got estimator= and also {', '.join(given)}; "
        "the estimator holds its key, n_samples, distribution and axis_name: "
        "set them in aho.hutchinson_estimator(...) (or "
        "aho.gnb_estimator(...)) only")
  if not isinstance(estimator, optax.GradientTransformation):
    raise TypeError(
        "estimator must be a gradient transformation whose update is the "
        "estimate, such as aho.hutchinson_estimator(...) or "
        f"aho.gnb_estimator(...), got {type(estimator).__name__}")
  return optax.with_extra_args_support(estimator)


def _check_refresh_flag(flag):
  if isinstance(flag, jax.Array):
    if flag.shape != () or flag.dtype != jnp.bool_:
      raise TypeError(
          "hessian_refresh given as an array must be a boolean scalar, got "
          f"shape {flag.shape} and dtype {flag.dtype}")
  elif not isinstance(flag, bool):
    raise TypeError(
        "hessian_refresh must be a Python bool (static under jit) or a "
        f"boolean scalar array, got {type(flag).__name__}")


def refresh_predicate(update_interval, count, hessian_refresh, hessian):
  """Whether this step refreshes the Hessian: the one rule.

  With ``update_interval=k`` (an int, or an array under inject_hyperparams)
  the steps whose count is a multiple of k refresh; with ``None`` the call
  says so, by ``hessian_refresh`` or by passing an estimate. Returns a Python
  bool when that is known at trace time, else a boolean array.
  """
  if update_interval is None:
    if hessian is not None:
      if hessian_refresh is not None and hessian_refresh is not True:
        raise ValueError(
            "update got an estimate (hessian=) with hessian_refresh="
            f"{hessian_refresh!r}; passing an estimate refreshes, so leave "
            "hessian_refresh out, and on steps without a refresh pass no "
            "hessian")
      return True
    if hessian_refresh is None:
      raise ValueError(
          "with update_interval=None the call decides each refresh: pass "
          "hessian_refresh=True or False (or a boolean array), or "
          "hessian=<the estimate of aho.value_grad_and_hessian>")
    _check_refresh_flag(hessian_refresh)
    return hessian_refresh
  if hessian_refresh is not None:
    raise ValueError(
        f"update got hessian_refresh={hessian_refresh!r}, but "
        f"update_interval={update_interval!r} already schedules the "
        "refreshes; to decide on each step yourself, construct the optimizer "
        "with update_interval=None")
  if not isinstance(update_interval, jax.Array) and update_interval == 1:
    return True
  if hessian is not None:
    raise ValueError(
        "update got an estimate (hessian=), but with update_interval="
        f"{update_interval!r} whether this step refreshes is decided at run "
        "time; construct the optimizer with update_interval=None and call "
        "value_grad_and_hessian on the refresh steps only (with "
        "inject_hyperparams and update_interval=1, pass "
        "static_args=('update_interval',))")
  return count % update_interval == 0


def dispatch(refresh, refresh_fn, curvature: Curvature) -> Curvature:
  """Applies `refresh_fn` to `curvature` when `refresh` says so.

  A Python bool compiles one program, with or without the refresh. An array
  selects at run time with `lax.cond`, so that skipped steps do not compute
  the Hessian-vector product. The refresh branch is traced through
  `_xla_cpu.call`: on XLA:CPU its convolutions are written in the layout
  that runs fast inside a branch (elsewhere it is `refresh_fn` itself).
  """
  if refresh is True:
    return refresh_fn(curvature)
  if refresh is False:
    return curvature
  return jax.lax.cond(refresh, functools.partial(_xla_cpu.call, refresh_fn),
                      lambda c: c, curvature)


def estimate_fn(params, value_fn, obj_fn, hessian, estimator, state):
  """`estimator state -> (diagonal, next state)`, from the estimate given or
  from the loss closure.

  This library's estimators give their estimate in at least float32
  (`next_estimate`); any other transformation whose update is the estimate
  (Sophia's `hessian_diagonal_fn` contract) is called as such.
  """
  if hessian is None:
    fn = _checks.check_value_fn(value_fn, obj_fn, "scale_by_adahessian.update")

    def from_closure(state):
      if isinstance(state, _estimators.EstimatorState):
        result, state = _estimators.next_estimate(state, fn, params,
                                                  value_and_grad=False)
        return result.diagonal, state
      return estimator.update(None, state, params, value_fn=fn)
    return from_closure
  if value_fn is not None or obj_fn is not None:
    raise ValueError(
        "update got both hessian= and a loss closure; the estimate already "
        "holds the Hessian pass, so pass only one")
  if not isinstance(hessian, _estimators.HessianEstimate):
    raise TypeError(
        "hessian must be the HessianEstimate returned by "
        f"aho.value_grad_and_hessian, got {type(hessian).__name__}")
  if (jax.tree.structure(hessian.estimator)
      != jax.tree.structure(state)):
    raise ValueError(
        "hessian was estimated with another estimator's state "
        f"({hessian.estimator!r}); call value_grad_and_hessian with this "
        "optimizer's own state")
  diagonal = hessian.diagonal
  if _checks.has_masked_node(params):
    diagonal = _compose.mask_like(params, diagonal)
  _tree.check_same_structure(
      params, diagonal, "hessian.diagonal",
      "; estimate it at the params given to update")
  return lambda state: (diagonal, hessian.estimator)


def refreshed(curvature, estimate_fn, split, rules, b2):
  """`curvature` after one Hessian refresh."""
  diagonal, estimator = estimate_fn(curvature.estimator)
  averaged = [
      jnp.abs(d) if rules[i] is None else rules[i].apply(jnp.abs(d))
      for i, d in zip(split.index, split.select(diagonal))
  ]
  nu = optax.tree.update_moment(averaged, curvature.nu, b2, 2)
  # A non-finite estimate (or an overflow of its square) would poison nu for
  # good, and optax.apply_if_finite only inspects the incoming gradients:
  # discard such an estimate and count it instead.
  finite = jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(v)) for v in nu] or [jnp.array(True)]))
  count, bad = curvature.hessian_count, curvature.nonfinite_hessian_count
  return Curvature(
      nu=optax.tree.where(finite, nu, curvature.nu),
      hessian_count=jnp.where(finite, optax.safe_increment(count), count),
      nonfinite_hessian_count=jnp.where(finite, bad,
                                        optax.safe_increment(bad)),
      estimator=estimator)
