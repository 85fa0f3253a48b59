r"""Extreme eigenvalues of an operator: Lanczos, stopped on Ritz residuals."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _checks
from adahessian_optax import _docs
from adahessian_optax import _tree
from adahessian_optax.algorithms import _common
from adahessian_optax.algorithms import _lanczos
from adahessian_optax.operators import _base
from adahessian_optax.operators import _curvature

_WHICH = ("largest", "smallest")


class LanczosInfo(NamedTuple):
  r"""How the Lanczos run of :func:`eigenpairs` ended.

  Attributes:
    residuals: :math:`\|A y_j - \theta_j y_j\|` for each returned pair,
      shape ``(k,)``; a true eigenvalue lies within it of :math:`\theta_j`.
    n_steps: the Lanczos steps taken, each one product.
    converged: whether every residual is at most ``tol`` times its own
      :math:`|\theta_j|` (plus a rounding-level floor, 100 machine epsilons
      of the largest :math:`|\theta|`); false when ``n_steps`` ran out
      first.
  """

  residuals: jax.Array
  n_steps: jax.Array
  converged: jax.Array


class Eigenpairs(NamedTuple):
  """Eigenvalues and eigenvectors from :func:`eigenpairs`.

  Attributes:
    values: the eigenvalues, shape ``(k,)`` in at least float32, descending
      (``which="largest"``) or ascending (``"smallest"``).
    vectors: the unit eigenvectors, a pytree like params whose leaves have a
      leading axis of size ``k``, each in its leaf's dtype (zeros at
      non-float leaves and outside the operator's entries); pass them back
      as ``init=`` to warm-start the next call.
    info: a :class:`LanczosInfo`: residuals, steps taken, convergence.
  """

  values: jax.Array
  vectors: Any
  info: LanczosInfo


@jax.jit
def _start_near(warm: list, probe: list) -> list:
  """`warm / |warm| + probe / (100 |probe|)`."""
  return [w / _lanczos.norm(warm) + z / (100 * _lanczos.norm(probe))
          for w, z in zip(_tree.widen(warm), probe)]


def _warm_start(op: _base.LinearOperator, init: Any) -> list:
  """The start vector from earlier eigenvectors: their sum, masked."""
  try:
    stacked = op.space.select(init)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "init must be the vectors of an earlier call (a pytree like params, "
        f"a leading axis per vector): {e}") from None
  v0 = []
  for v, (shape, _) in zip(stacked, op.space.shapes):
    v = jnp.asarray(v)
    if v.shape[1:] != tuple(shape):
      raise ValueError(
          f"an init leaf of shape {v.shape} does not match its parameter's "
          f"shape {tuple(shape)} with a leading vector axis")
    v0.append(jnp.sum(_tree.widen([v])[0], axis=0))
  return _base.mask_vector(op, v0)


def _top_pairs(op, loops, v0, *, n_steps, k, tol, negate):
  """`(theta, vectors, residuals, steps, converged)` of a Lanczos run from
  `v0` until the `k` largest pairs of `op` (of `-op`) meet `tol`."""
  apply = _common.product(op)
  if negate:
    positive = apply
    apply = lambda v: _lanczos.scale(positive(v), -1)
  state, n, done = _lanczos.lanczos_until_converged(
      apply, v0, n_steps, k, tol, loops, dim=op.size)
  return (*_lanczos.top_pairs(state, n, k), n, done)


@_docs.shared
def eigenpairs(op: _base.LinearOperator, key: Any, *, k: int = 1,
               which: str = "largest", tol: float = 1e-4,
               n_steps: Optional[int] = None, init: Any = None) -> Eigenpairs:
  r"""The `k` largest (or most negative) eigenvalues of an operator.

  Lanczos with full reorthogonalisation from a normalised Rademacher vector
  :math:`v_1`: after :math:`m` steps, :math:`A V_m = V_m T_m + \beta_m
  v_{m+1} e_m^\top` with :math:`V_m` orthonormal and :math:`T_m`
  tridiagonal, one product per step. The Ritz pairs
  :math:`(\theta_j, y_j = V_m s_j)`, from :math:`T_m s_j = \theta_j s_j`,
  have residuals

  .. math::
    \|A y_j - \theta_j y_j\| = |\beta_m\, s_{m,j}|,

  read off without another product. Steps continue until the `k` wanted
  pairs have residuals at most ``tol`` times their own :math:`|\theta_j|`
  (with a floor at rounding level), or ``n_steps``; each eigenvalue is
  then within its residual of a true one (and usually within
  residual\ :sup:`2`/gap). Unlike power iteration (PyHessian), which finds
  the largest :math:`|\lambda|`, this gives the largest algebraic
  eigenvalues, or with ``which="smallest"`` the most negative ones
  (Lanczos on :math:`-A`). A single-vector Krylov method sees one copy of
  an exactly repeated eigenvalue until the Krylov space is exhausted.

  The Lanczos basis holds ``n_steps + 1`` vectors the size of the
  operator's leaves (in at least float32): lower ``n_steps`` for large
  models. **During training**, pass the previous call's ``vectors`` as
  ``init``: Lanczos then starts from their sum (plus a hundredth of a
  random probe, so that a new top direction orthogonal to them is still
  found) and, while the top eigenvectors move little between calls,
  converges in a few products.

  Args:
    <<op>>
    key: an int seed or a JAX PRNG key for the start vector.
    k: how many eigenvalues, 1 to the operator's size.
    which: ``"largest"`` or ``"smallest"``.
    tol: the residual tolerance, relative to each :math:`|\theta_j|`.
    n_steps: the most Lanczos steps, each one product (default
      ``min(size, max(100, 3 k))``), from ``k`` to the size.
    init: the ``vectors`` of an earlier call (a warm start), or None for a
      Rademacher start.

  Returns:
    An :class:`Eigenpairs` ``(values, vectors, info)``. A jitted function
    cannot raise on a value: check ``info.converged`` to know that the
    tolerance was met. Outside jit, non-finite products are an error.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> H = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    >>> op = aho.curvature_operator(lambda p: 0.5 * p @ H @ p, jnp.zeros(3))
    >>> values, vectors, info = aho.eigenpairs(op, key=0, k=2)
    >>> print(jnp.round(values, 4), vectors.shape, bool(info.converged))
    [4.7321 3.    ] (2, 3) True
    >>> print(jnp.round(jnp.linalg.eigvalsh(H)[::-1][:2], 4))
    [4.7321 3.    ]

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators
    <https://doi.org/10.6028/jres.045.026>`_, 1950.

    Golub and Van Loan, Matrix Computations, 4th ed., section 10.1.
  """
  _common.check_operator(op, "eigenpairs")
  _common.check_choice("which", which, _WHICH)
  _checks.check_interval("tol", tol, 0.0, 1.0, low_open=True, high_open=True)
  key = _common.key_of(key, "eigenpairs")
  dim = op.size
  _common.check_steps("k", k, 1, dim, "the number of eigenvalues")
  if n_steps is None:
    n_steps = min(dim, max(100, 3 * k))
  _common.check_steps("n_steps", n_steps, k, dim, "at least k")
  _, v0 = _common.draw(op, key)
  if init is not None:
    v0 = _start_near(_warm_start(op, init), v0)
  negate = which == "smallest"
  theta, vectors, residuals, n, done = op.run(
      _top_pairs, v0, n_steps=n_steps, k=k, tol=float(tol), negate=negate)
  _common.check_finite(theta)
  values = -theta if negate else theta
  return Eigenpairs(values,
                    op.space.embed(_common.in_dtypes(op.space, vectors), (k,)),
                    LanczosInfo(residuals, n, done))


@_docs.shared
def hessian_eigenvalues(value_fn: Any, params: Any, key: Any, *, k: int = 1,
                        which: str = "largest", tol: float = 1e-4,
                        n_steps: Optional[int] = None, init: Any = None,
                        wrt: Any = None, preconditioner: Any = None,
                        axis_name: Optional[str] = None) -> Eigenpairs:
  r"""The `k` largest (or most negative) eigenvalues of a loss's Hessian.

  :func:`eigenpairs` of ``curvature_operator(value_fn, params, wrt=wrt,
  preconditioner=preconditioner, axis_name=axis_name)``: Lanczos with full
  reorthogonalisation, stopped when the Ritz residuals meet ``tol``. The
  curvature is the Hessian for a plain closure, the GGN for a
  :func:`ggn`, and so on (see :func:`curvature_operator`). Under
  ``jax.jit`` the run is a ``lax.while_loop``, so it can sit inside a
  training step. With ``preconditioner`` :math:`P` it gives the
  preconditioned sharpness :math:`\lambda_{\max}(P^{-1/2} H P^{-1/2})`
  that governs the stability of adaptive methods
  (:func:`adam_preconditioner`, :func:`adahessian_preconditioner`).

  Args:
    <<value_fn>>
    params: the pytree at which to take the Hessian.
    key: an int seed or a JAX PRNG key for the start vector.
    k: how many eigenvalues, 1 to the number of float entries.
    which: ``"largest"`` or ``"smallest"``.
    tol: the residual tolerance, relative to each :math:`|\theta_j|`.
    n_steps: the most Lanczos steps (default ``min(dimension, max(100,
      3 k))``).
    init: the ``vectors`` of an earlier call (a warm start), or None.
    <<wrt>>
    <<preconditioner>>
    <<axis_name>>

  Returns:
    An :class:`Eigenpairs` ``(values, vectors, info)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> H = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    >>> loss = lambda p: 0.5 * p @ H @ p
    >>> values, vectors, info = aho.hessian_eigenvalues(loss, jnp.zeros(3),
    ...                                                 key=0, k=2)
    >>> print(jnp.round(values, 4), vectors.shape, bool(info.converged))
    [4.7321 3.    ] (2, 3) True
  """
  value_fn = _checks.check_value_fn(value_fn, None, "hessian_eigenvalues")
  key = _common.key_of(key, "hessian_eigenvalues")
  op = _curvature.curvature_operator(
      value_fn, params, wrt=wrt, preconditioner=preconditioner,
      axis_name=axis_name)
  return eigenpairs(op, key, k=k, which=which, tol=tol, n_steps=n_steps,
                    init=init)
