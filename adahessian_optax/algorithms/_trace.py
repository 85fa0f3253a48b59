r"""The trace of an operator, in all and per leaf: Hutchinson and Hutch++."""

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _checks
from adahessian_optax import _docs
from adahessian_optax import _probes
from adahessian_optax.algorithms import _common
from adahessian_optax.algorithms import _lanczos
from adahessian_optax.operators import _base
from adahessian_optax.operators import _curvature

_METHODS = ("hutchinson", "hutch++")


class HessianTrace(NamedTuple):
  r"""A stochastic estimate of the trace of an operator :math:`A`.

  Attributes:
    estimate: the estimate of :math:`\mathrm{tr}(A)`, the mean of `samples`.
    stderr: its standard error, the sample standard deviation of `samples`
      over the square root of their number (NaN for a single sample).
    per_leaf: a pytree like params: at each leaf acted on the estimate
      of the trace of that leaf's diagonal block of :math:`A` (the
      per-layer trace); zeros at the other leaves. They sum to `estimate`.
    per_leaf_stderr: the standard errors of `per_leaf`, likewise.
    samples: the independent samples whose mean is `estimate`, shape
      ``(n,)``: :math:`z_s^\top A z_s` for Hutchinson (``n = n_samples``);
      for Hutch++, :math:`\mathrm{tr}(Q^\top A Q) + g_s^\top (I - QQ^\top)
      A (I - QQ^\top) g_s` (``n = n_samples - 2 (n_samples // 3)``).
  """

  estimate: jax.Array
  stderr: jax.Array
  per_leaf: Any
  per_leaf_stderr: Any
  samples: jax.Array


def _hutchinson(op, loops, key, *, n, distribution):
  """Per-leaf samples `<z_l, (Az)_l>`, shape `(n, leaves)`."""
  def one(key):
    key, z = _common.draw(op, key, distribution)
    return key, _lanczos.leaf_dots(z, _common.product(op)(z))

  exact = jnp.zeros(len(op.space.index), jnp.float32)
  return exact, loops.scan(one, key, n)[1]


@jax.jit
def _append_orthonormal(q: list, j: Any, y: list) -> list:
  """`q` with row `j` set to `y` orthonormalised against it (or zero)."""
  y_norm = _lanczos.norm(y)
  y, _ = _lanczos.orthogonalize(q, y)
  r = _lanczos.norm(y)
  # A column numerically in the span of the others (a low-rank A) is dropped.
  keep = r > 100 * jnp.finfo(r.dtype).eps * y_norm
  y = _lanczos.scale(y, jnp.where(keep, 1 / jnp.where(keep, r, 1), 0))
  return [v.at[j].set(x) for v, x in zip(q, y)]


def _hutch_plus_plus(op, loops, key, *, n, distribution):
  """`(exact, samples)`: per-leaf `tr(Q^T A Q)` and residual samples.

  Meyer, Musco, Musco and Woodruff's Hutch++ with `n` products: a third
  sketch the range, `Q = orth(A S)`; a third give `tr(Q^T A Q)` exactly; the
  rest are Hutchinson probes of the deflated `(I - P) A (I - P)`.
  """
  r = n // 3
  q = [_lanczos.stacked_zeros(x, r) for x in _common.zeros(op)]

  def sketch(j, carry):
    key, q = carry
    key, s = _common.draw(op, key, distribution)
    return key, _append_orthonormal(q, j, _common.product(op)(s))

  key, q = loops.fori_loop(0, r, sketch, (key, q))

  def exact(j, total):
    v = _lanczos.row(q, j)
    return total + _lanczos.leaf_dots(v, _common.product(op)(v))

  exact_part = loops.fori_loop(
      0, r, exact, jnp.zeros(len(op.space.index),
                             _lanczos.accumulation_dtype(q)))

  def residual(key):
    key, g = _common.draw(op, key, distribution)
    u, _ = _lanczos.orthogonalize(q, g)
    return key, _lanczos.leaf_dots(u, _common.product(op)(u))

  return exact_part, loops.scan(residual, key, n - 2 * r)[1]


def _stderr(samples: jax.Array) -> jax.Array:
  n = samples.shape[0]
  if n < 2:
    return jnp.full(samples.shape[1:], jnp.nan, samples.dtype)
  return jnp.std(samples, axis=0, ddof=1) / math.sqrt(n)


@jax.jit
def _summary(exact: jax.Array, samples: jax.Array):
  """`(estimate, stderr, per-leaf list, per-leaf stderr list, totals)`."""
  exact = exact.astype(samples.dtype)
  per_leaf = exact + jnp.mean(samples, axis=0)
  totals = jnp.sum(exact) + jnp.sum(samples, axis=1)
  return (jnp.sum(per_leaf), _stderr(totals), list(per_leaf),
          list(_stderr(samples)), totals)


@_docs.shared
def trace(op: _base.LinearOperator, key: Any, *, n_samples: int = 100,
          method: str = "hutchinson",
          distribution: str = "rademacher") -> HessianTrace:
  r"""Estimates the trace of an operator, in all and per leaf.

  Hutchinson: for probes :math:`z_s` with independent entries of mean 0 and
  variance 1,

  .. math::
    \widehat{\mathrm{tr}}(A) = \frac1S \sum_{s=1}^S z_s^\top A z_s, \qquad
    \mathrm{Var}(z^\top A z) = \begin{cases}
      2\,(\|A\|_F^2 - \sum_i A_{ii}^2) & \text{Rademacher,} \\
      2\,\|A\|_F^2 & \text{Gaussian,} \end{cases}

  so the error falls as :math:`1/\sqrt{S}`. Hutch++ (``method="hutch++"``)
  spends the same :math:`S` products differently: :math:`S/3` sketch the
  dominant range :math:`Q = \mathrm{orth}(A\,[s_1 \dots s_{S/3}])`,
  :math:`S/3` compute :math:`\mathrm{tr}(Q^\top A Q)` exactly, and the rest
  estimate the trace of the deflated :math:`(I - QQ^\top) A (I - QQ^\top)`
  with Hutchinson; for a positive semi-definite :math:`A` its error falls as
  :math:`1/S`. Its estimate is unbiased given :math:`Q`, so the sample
  standard error of the deflated part is its standard error.

  The trace of leaf :math:`l`'s diagonal block is estimated from the same
  products, :math:`\frac1S \sum_s \langle z_{s,l}, (A z_s)_l \rangle` (for
  Hutch++ the exact part's and the deflated probes' per-leaf terms): the
  per-layer sharpness users compare.

  Args:
    <<op>>
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: the number of products (at least 3 for Hutch++).
    method: ``"hutchinson"`` or ``"hutch++"``. Hutch++ holds its sketch,
      ``n_samples // 3`` vectors the size of the operator's leaves (in at
      least float32); Hutchinson holds none.
    distribution: ``"rademacher"`` (the smallest variance) or
      ``"gaussian"``.

  Returns:
    A :class:`HessianTrace` (``estimate``, ``stderr``, ``per_leaf``,
    ``per_leaf_stderr``, ``samples``), in at least float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(p["a"] ** 2) + 3 * jnp.sum(p["b"] ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> op = aho.curvature_operator(loss, params)
    >>> result = aho.trace(op, key=0, n_samples=10)
    >>> print(result.estimate, result.stderr)   # exact: H is diagonal
    22.0 0.0
    >>> print(result.per_leaf["a"], result.per_leaf["b"])
    4.0 18.0

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines
    <https://doi.org/10.1080/03610918908812806>`_, 1989.

    Meyer, Musco, Musco and Woodruff, `Hutch++: Optimal Stochastic Trace
    Estimation <https://arxiv.org/abs/2010.09649>`_, SOSA 2021.
  """
  _common.check_operator(op, "trace")
  _common.check_choice("method", method, _METHODS)
  _probes.check_distribution(distribution)
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  if method == "hutch++" and n_samples < 3:
    raise ValueError(
        f"hutch++ needs n_samples >= 3 (a third each for the sketch, its "
        f"trace and the residual), got {n_samples}")
  key = _common.key_of(key, "trace")
  algorithm = _hutchinson if method == "hutchinson" else _hutch_plus_plus
  exact, samples = op.run(algorithm, key, n=n_samples,
                          distribution=distribution)
  estimate, stderr, per_leaf, per_leaf_stderr, totals = _summary(exact,
                                                                 samples)
  _common.check_finite(estimate)
  return HessianTrace(
      estimate=estimate,
      stderr=stderr,
      per_leaf=op.space.embed(per_leaf, None),
      per_leaf_stderr=op.space.embed(per_leaf_stderr, None),
      samples=totals)


@_docs.shared
def hessian_trace(value_fn: Any, params: Any, key: Any, *,
                  n_samples: int = 100, method: str = "hutchinson",
                  distribution: str = "rademacher", wrt: Any = None,
                  preconditioner: Any = None,
                  axis_name: Optional[str] = None) -> HessianTrace:
  r"""Estimates the trace of a loss's Hessian, in all and per leaf.

  :func:`trace` (Hutchinson or Hutch++) of ``curvature_operator(value_fn,
  params, wrt=wrt, preconditioner=preconditioner, axis_name=axis_name)``.
  Each product costs a tangent pass (after one primal pass per call) or,
  for a :class:`DatasetLoss`, a pass over the data.

  Args:
    <<value_fn>>
    params: the pytree at which to take the Hessian. Only its
      floating-point leaves are differentiated.
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: the number of products (at least 3 for Hutch++).
    method: ``"hutchinson"`` or ``"hutch++"``.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    <<wrt>>
    <<preconditioner>>
    <<axis_name>>

  Returns:
    A :class:`HessianTrace`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(p["a"] ** 2) + 3 * jnp.sum(p["b"] ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> result = aho.hessian_trace(loss, params, key=0, n_samples=10)
    >>> print(result.estimate, result.per_leaf["a"], result.per_leaf["b"])
    22.0 4.0 18.0
  """
  value_fn = _checks.check_value_fn(value_fn, None, "hessian_trace")
  _common.check_choice("method", method, _METHODS)
  _probes.check_distribution(distribution)
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  key = _common.key_of(key, "hessian_trace")
  op = _curvature.curvature_operator(
      value_fn, params, wrt=wrt, preconditioner=preconditioner,
      axis_name=axis_name)
  return trace(op, key, n_samples=n_samples, method=method,
               distribution=distribution)
