r"""The spectral density of an operator: stochastic Lanczos quadrature."""

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_optax import _checks
from adahessian_optax import _docs
from adahessian_optax.algorithms import _common
from adahessian_optax.algorithms import _lanczos
from adahessian_optax.operators import _base
from adahessian_optax.operators import _curvature


class SpectralDensity(NamedTuple):
  r"""The eigenvalue density of an operator as Gauss quadratures, one a probe.

  Probe :math:`p` gives nodes :math:`\theta_{p,k}` and weights
  :math:`w_{p,k}` with :math:`\sum_k w_{p,k} = 1`; the density estimate is

  .. math::
    \hat\phi(x) = \frac1P \sum_{p=1}^P \sum_{k=1}^m w_{p,k}\,
    \mathcal N(x;\ \theta_{p,k},\ \sigma^2),

  an estimate of :math:`\frac1n \sum_i \mathcal N(x; \lambda_i, \sigma^2)`
  (integral 1; multiply by the number of parameters for counts).

  Attributes:
    nodes: Ritz values, shape ``(n_samples, n_steps)``, ascending per
      probe.
    weights: squared first components of the eigenvectors of each probe's
      tridiagonal matrix, shape ``(n_samples, n_steps)``.
  """

  nodes: jax.Array
  weights: jax.Array

  def density(self, grid: Any, sigma: Any) -> jax.Array:
    r"""The Gaussian-smoothed density :math:`\hat\phi` at the points `grid`.

    Args:
      grid: points :math:`x`, any shape.
      sigma: the standard deviation of each Gaussian (> 0).

    Returns:
      :math:`\hat\phi(x)`, shaped like `grid`.
    """
    _checks.check_interval("sigma", sigma, 0.0, np.inf, low_open=True)
    grid = jnp.asarray(grid, self.nodes.dtype)
    sigma = jnp.asarray(sigma, self.nodes.dtype)
    z = (grid[..., None, None] - self.nodes) / sigma
    gauss = jnp.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    return jnp.sum(self.weights * gauss, axis=(-2, -1)) / self.nodes.shape[0]

  def plot(self, ax: Any = None, *, sigma: Optional[float] = None,
           num_points: int = 1000, log: bool = True, **plot_kwargs) -> Any:
    """Plots the density with matplotlib (imported here, only when used).

    Args:
      ax: the matplotlib axes (default: a new figure's).
      sigma: the Gaussian width; default 1% of the range of the nodes.
      num_points: grid points, spanning the nodes and 5 sigma beyond.
      log: a logarithmic density axis (the outliers of a network's
        spectrum are many decades less dense than its bulk).
      **plot_kwargs: passed to ``ax.plot`` (e.g. ``label``).

    Returns:
      The axes.
    """
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    nodes = np.asarray(self.nodes, np.float64)
    low, high = nodes.min(), nodes.max()
    if sigma is None:
      sigma = 0.01 * (high - low) or 0.01 * max(abs(high), 1.0)
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    density = np.asarray(self.density(grid, sigma), np.float64)
    if ax is None:
      ax = plt.figure().gca()
    ax.plot(grid, density, **plot_kwargs)
    if log:
      ax.set_yscale("log")
      ax.set_ylim(bottom=density.max() * 1e-8)
    ax.set(xlabel="eigenvalue", ylabel="density")
    return ax


def _quadratures(op, loops, key, *, n_samples, n_steps):
  """`(nodes, weights)` of `n_samples` Lanczos runs of `n_steps` steps, each
  from the next probe."""
  def one(key):
    key, v0 = _common.draw(op, key)
    state = _lanczos.lanczos(_common.product(op), v0, n_steps, loops)
    return key, _lanczos.quadrature(state)

  return loops.scan(one, key, n_samples)[1]


@_docs.shared
def spectral_density(op: _base.LinearOperator, key: Any, *,
                     n_samples: int = 10, n_steps: Optional[int] = None
                     ) -> SpectralDensity:
  r"""The eigenvalue spectral density of an operator, by Lanczos quadrature.

  Stochastic Lanczos quadrature (SLQ): for each of `n_samples` Rademacher
  probes :math:`z`, `n_steps` steps of Lanczos with full
  reorthogonalisation from :math:`v = z / \|z\|` give a tridiagonal
  :math:`T = S \Theta S^\top`; its eigenvalues are the nodes and
  :math:`w_k = S_{1k}^2` the weights of the Gauss quadrature of the spectral
  measure of :math:`v`:

  .. math::
    \sum_k w_k\, \theta_k^j = v^\top A^j v \quad (j \le 2m - 1), \qquad
    \sum_k w_k = 1,

  so :math:`n \sum_k w_k \theta_k = z^\top A z` is the Hutchinson sample of
  the same probe (the :math:`s`-th probe of :func:`trace` with the same
  key) and :math:`\mathbb E\, v^\top f(A) v = \mathrm{tr} f(A) / n`.
  Costs ``n_samples * n_steps`` products; memory ``n_steps + 1`` vectors
  the size of the operator's leaves, whatever ``n_samples``.

  Args:
    <<op>>
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: the number of probes (independent Lanczos runs).
    n_steps: Lanczos steps per probe, at most the operator's size
      (default ``min(50, size)``).

  Returns:
    A :class:`SpectralDensity` with ``nodes`` and ``weights`` of shape
    ``(n_samples, n_steps)``; ``.density(grid, sigma)`` smooths it and
    ``.plot()`` draws it.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> A = jnp.diag(jnp.array([1.0, 2.0, 2.0, 5.0]))
    >>> op = aho.linear_operator(lambda v: A @ v, jnp.zeros(4))
    >>> esd = aho.spectral_density(op, key=0, n_samples=2, n_steps=3)
    >>> print(jnp.round(esd.nodes, 3))   # the distinct eigenvalues
    [[1. 2. 5.]
     [1. 2. 5.]]
    >>> print(jnp.round(esd.weights, 3))   # their shares of the spectrum
    [[0.25 0.5  0.25]
     [0.25 0.5  0.25]]

  References:
    Golub and Meurant, Matrices, Moments and Quadrature with Applications,
    2010.

    Ghorbani, Krishnan and Xiao, `An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density
    <https://arxiv.org/abs/1901.10159>`_, ICML 2019.
  """
  _common.check_operator(op, "spectral_density")
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  if n_steps is None:
    n_steps = min(50, op.size)
  _common.check_steps("n_steps", n_steps, 1, op.size,
                      "Lanczos steps per probe")
  key = _common.key_of(key, "spectral_density")
  nodes, weights = op.run(_quadratures, key, n_samples=n_samples,
                          n_steps=n_steps)
  _common.check_finite(nodes)
  return SpectralDensity(nodes, weights)


@_docs.shared
def hessian_spectrum(value_fn: Any, params: Any, key: Any, *,
                     n_samples: int = 10, n_steps: Optional[int] = None,
                     wrt: Any = None, preconditioner: Any = None,
                     axis_name: Optional[str] = None) -> SpectralDensity:
  r"""The eigenvalue spectral density of a loss's Hessian.

  :func:`spectral_density` (stochastic Lanczos quadrature) of
  ``curvature_operator(value_fn, params, wrt=wrt,
  preconditioner=preconditioner, axis_name=axis_name)``.

  Args:
    <<value_fn>>
    params: the pytree at which to take the Hessian.
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: the number of probes (independent Lanczos runs).
    n_steps: Lanczos steps per probe, at most the dimension (default
      ``min(50, dimension)``).
    <<wrt>>
    <<preconditioner>>
    <<axis_name>>

  Returns:
    A :class:`SpectralDensity`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> H = jnp.diag(jnp.array([1.0, 2.0, 2.0, 5.0]))
    >>> loss = lambda p: 0.5 * p @ H @ p
    >>> esd = aho.hessian_spectrum(loss, jnp.zeros(4), key=0, n_samples=2,
    ...                            n_steps=3)
    >>> print(jnp.round(esd.weights[0], 3))
    [0.25 0.5  0.25]
  """
  value_fn = _checks.check_value_fn(value_fn, None, "hessian_spectrum")
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  key = _common.key_of(key, "hessian_spectrum")
  op = _curvature.curvature_operator(
      value_fn, params, wrt=wrt, preconditioner=preconditioner,
      axis_name=axis_name)
  return spectral_density(op, key, n_samples=n_samples, n_steps=n_steps)
