"""Lanczos with full reorthogonalisation, on lists of leaves.

A vector is a list of arrays, one per floating-point leaf of the params, each
in at least float32; the Krylov basis is such a list with a leading axis for
the basis vectors, so every leaf of the basis can be sharded like its
parameter and nothing is raveled into one array. Inner products are sums of
per-leaf reductions, accumulated in the widest of the leaves' dtypes.

The same algorithms run under two kinds of loop (:mod:`adahessian_optax._loops`):
``lax`` loops for a traced matvec and Python loops for a matvec that runs as
programs of its own (a pass over a dataset's batches). The array steps are
jitted functions, shared by both; in Python loops each compiles once per
shape and is reused across calls.

matfree's Lanczos is not used: it ravels the pytree into one vector (which
gathers sharded params and casts mixed float32/bfloat16 leaves to one
dtype), needs a traceable matvec (no host loop over batches), and its 0.y
API is not stable.
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _loops
from adahessian_optax import _tree

_HIGHEST = jax.lax.Precision.HIGHEST
# A step whose new direction is shorter than this many epsilons of the
# largest coefficient seen so far has found an invariant subspace.
_BREAKDOWN_EPS = 100
_SMALLEST_BUCKET = 8
_RESTART_FREQUENCY = 2.399963229728653  # the golden angle, in radians


# ---------------------------------------------------------------------------
# Linear algebra on lists of leaves.


def accumulation_dtype(leaves: list) -> Any:
  """The widest of the leaves' dtypes, at least float32."""
  return max((_tree.at_least_float32(x.dtype) for x in leaves),
             key=lambda d: jnp.finfo(d).bits)


def dimension(leaves: list) -> int:
  return sum(math.prod(x.shape) for x in leaves)


@jax.jit
def leaf_dots(a: list, b: list) -> jax.Array:
  """`[<a_l, b_l> for each leaf l]`, shape (number of leaves,)."""
  dtype = accumulation_dtype(a)
  return jnp.stack([jnp.sum(x * y).astype(dtype) for x, y in zip(a, b)])


def norm(a: list) -> jax.Array:
  return jnp.sqrt(jnp.sum(leaf_dots(a, a)))


@jax.jit
def scale(a: list, c: Any) -> list:
  return [x * jnp.asarray(c).astype(x.dtype) for x in a]


def _several_devices() -> bool:
  return jax.device_count() > 1


def _project(basis: list, w: list) -> jax.Array:
  """`V^T w`: one coefficient per row of the basis.

  A dot product per leaf, or with several devices a multiply and a sum: on a
  2-D mesh XLA (jax 0.10, CPU) was seen to miscompile the dot of a basis
  with a vector sharded differently (a Ritz value 1% off, reported
  converged). The multiply-sum is about 1.6x slower on one CPU core.
  """
  dtype = accumulation_dtype(w)
  if _several_devices():
    return sum(jnp.sum(v * x[None].astype(v.dtype),
                       axis=tuple(range(1, v.ndim))).astype(dtype)
               for v, x in zip(basis, w))
  return sum(jnp.tensordot(v, x, axes=x.ndim, precision=_HIGHEST).astype(dtype)
             for v, x in zip(basis, w))


def combine(coefficients: jax.Array, basis: list) -> list:
  """`c V`: coefficients of shape `(rows,)` or `(k, rows)` times the basis.

  A dot product whatever the devices: the coefficients are replicated, so
  the basis is not dotted with a vector sharded otherwise (`_project`). A
  multiply and a sum over the rows instead made a Lanczos step of GPT-2
  small on 8 simulated devices about 20 times slower (a reduction over the
  major axis of every leaf).
  """
  return [jnp.tensordot(coefficients.astype(v.dtype), v, axes=1,
                        precision=_HIGHEST) for v in basis]


@jax.jit
def orthogonalize(basis: list, w: list) -> tuple[list, jax.Array]:
  """`w` minus its projection on the basis, and the coefficients removed.

  Classical Gram-Schmidt twice ("twice is enough"): one pass leaves an error
  proportional to the condition of the basis, the second removes it. Rows of
  the basis that are zero do not contribute.
  """
  total = 0
  for _ in range(2):
    c = _project(basis, w)
    w = [x - y for x, y in zip(w, combine(c, basis))]
    total = total + c
  return w, total


# ---------------------------------------------------------------------------
# The Lanczos process.


class Krylov(NamedTuple):
  """A Lanczos run: the basis and the tridiagonal matrix built so far.

  Attributes:
    basis: one array per leaf, shape ``(num_steps + 1, *leaf.shape)``; row
      ``i`` is the ``i``-th Lanczos vector (zeros where none yet).
    alpha: the diagonal of the tridiagonal matrix, ``(num_steps,)``.
    beta: ``beta[i]`` couples vectors ``i`` and ``i + 1``; ``0`` where an
      invariant subspace was found and the next vector is a restart.
    restarts: how many restarts so far.
  """

  basis: list
  alpha: jax.Array
  beta: jax.Array
  restarts: jax.Array


@jax.jit
def _normalized(w: list) -> list:
  return scale(w, 1 / norm(w))


def stacked_zeros(x: jax.Array, rows: int) -> jax.Array:
  """Zeros of shape `(rows, *x.shape)`, sharded like `x` along the rest."""
  return jnp.broadcast_to(jnp.zeros_like(x), (rows,) + x.shape)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def start(v0: list, num_steps: int) -> Krylov:
  """A Lanczos run from `v0` (normalised here) with room for `num_steps`.

  Jitted, so that every array of the run lives on the devices of `v0` from
  the start and the steps compile once (not once more for their own
  outputs' placement).
  """
  v0 = _normalized(_tree.widen(v0))
  # Padding keeps each leaf's sharding.
  basis = [jnp.pad(x[None], [(0, num_steps)] + [(0, 0)] * x.ndim) for x in v0]
  dtype = accumulation_dtype(v0)
  return Krylov(basis, jnp.zeros(num_steps, dtype),
                jnp.zeros(num_steps, dtype), jnp.zeros((), jnp.int32))


@jax.jit
def row(basis: list, i: Any) -> list:
  """Row `i` of a stacked basis."""
  return [v[i] for v in basis]


def _restart(basis: list, restarts: jax.Array) -> list:
  """A unit vector orthogonal to the basis, new at every restart.

  The start vector times a cosine of the entry's index, at an irrational
  frequency that changes with each restart: no vector of the basis is
  likely to be a combination of such vectors, and unlike a fresh random
  draw it adds no generator to the compiled step.
  """
  frequency = (restarts + 1).astype(jnp.float32) * _RESTART_FREQUENCY
  z, offset = [], 0
  for v in basis:
    x = v[0]
    index = offset + jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
    z.append(x * jnp.cos(frequency * index).astype(x.dtype))
    offset += x.size
  z, _ = orthogonalize(basis, z)
  return _normalized(z)


def _orthogonalize_leading(basis: list, w: list, n: Any
                           ) -> tuple[list, jax.Array]:
  """`orthogonalize` against the first `n` rows of the basis (the rest are
  zeros), on the smallest leading block of 8, 32, 128... rows that holds
  them: a step costs in proportion to the steps taken so far, not to the
  room left for more."""
  rows = basis[0].shape[0]

  def on_leading(size, basis, w):
    w, c = orthogonalize([v[:size] for v in basis], w)
    return w, jnp.pad(c, (0, rows - size))

  return _on_leading_block(on_leading, rows, n, basis, w)


def _on_leading_block(fn: Callable, length: int, n: Any, *operands: Any):
  """`fn(size, *operands)` for the smallest of the sizes 8, 32, 128...,
  `length` that holds `n` (chosen at run time, each size compiled once)."""
  sizes = _bucket_sizes(length)
  index = jnp.searchsorted(jnp.asarray(sizes), n)
  return jax.lax.switch(index, [functools.partial(fn, size) for size in sizes],
                        *operands)


@jax.jit
def absorb(state: Krylov, i: Any, w: list) -> Krylov:
  """Step `i` given `w = A v_i`: `alpha_i`, `beta_i` and `v_{i+1}`.

  Full reorthogonalisation: `w` is orthogonalised against every vector so
  far, which includes the three-term recurrence
  `w - alpha_i v_i - beta_{i-1} v_{i-1}` and keeps the basis orthonormal to
  working precision (no spurious copies of converged eigenvalues). When
  `beta_i` vanishes (an invariant subspace: the Ritz values are exact) the
  run goes on from a new vector orthogonal to the basis, with
  `beta_i = 0`, so the tridiagonal matrix splits into blocks.
  """
  w, c = _orthogonalize_leading(state.basis, _tree.widen(w), i + 1)
  alpha = state.alpha.at[i].set(c[i])
  beta_i = norm(w)
  seen = jnp.maximum(jnp.max(jnp.abs(alpha)), jnp.max(state.beta))
  broke = beta_i <= _BREAKDOWN_EPS * jnp.finfo(beta_i.dtype).eps * seen
  v_next = jax.lax.cond(broke, _restart, lambda *_: scale(w, 1 / beta_i),
                        state.basis, state.restarts)
  basis = [v.at[i + 1].set(x) for v, x in zip(state.basis, v_next)]
  beta = state.beta.at[i].set(jnp.where(broke, 0, beta_i))
  return Krylov(basis, alpha, beta, state.restarts + broke.astype(jnp.int32))


def lanczos(matvec: Callable[[list], list], v0: list, num_steps: int,
            loops: _loops.Loops) -> Krylov:
  """`num_steps` Lanczos steps from `v0`: one matvec each."""
  def body(i, state):
    return absorb(state, i, matvec(row(state.basis, i)))

  return loops.fori_loop(0, num_steps, body, start(v0, num_steps))


def ritz(alpha: jax.Array, beta: jax.Array, n: Any):
  """Ritz values, vectors of T and residuals after `n` of `len(alpha)` steps.

  Returns `(theta, s, residuals)`, `theta` ascending: the leading `n x n`
  block of T is the tridiagonal matrix; the rest of the diagonal holds a
  value below every Gershgorin disc of that block, so the `n` Ritz values
  of the run are the last `n` of `theta`, their vectors (the columns of `s`)
  are zero below row `n`, and `residuals[j] = |beta_{n-1} s_{n-1, j}|`,
  which is `||A y_j - theta_j y_j||` for the Ritz vector `y_j = V s_j`.
  """
  m = alpha.shape[0]
  index = jnp.arange(m)
  off = jnp.where(index[:-1] < n - 1, beta[:-1], 0)
  radius = (jnp.abs(jnp.concatenate([off, jnp.zeros(1, off.dtype)]))
            + jnp.abs(jnp.concatenate([jnp.zeros(1, off.dtype), off])))
  lowest = jnp.min(jnp.where(index < n, alpha - radius, jnp.inf))
  diagonal = jnp.where(index < n, alpha, lowest - 1 - jnp.abs(lowest))
  t = jnp.diag(diagonal) + jnp.diag(off, 1) + jnp.diag(off, -1)
  theta, s = jnp.linalg.eigh(t)
  residuals = jnp.abs(beta[n - 1] * s[n - 1])
  return theta, s, residuals


def _converged_at_size(alpha, beta, n, k, tol, dim):
  theta, s, residuals = ritz(alpha, beta, n)
  size = alpha.shape[0]
  index = jnp.arange(size)
  active = index >= size - n
  # Relative to each pair's own |theta| (ARPACK's test), with a floor at
  # rounding level: relative to the largest |theta| alone, a Ritz value
  # inside the spectrum could pass while a larger eigenvalue is still
  # unseen, when the other end of the spectrum dominates the norm.
  norm = jnp.max(jnp.where(active, jnp.abs(theta), 0))
  bound = tol * jnp.abs(theta) + 100 * jnp.finfo(theta.dtype).eps * norm
  wanted = jnp.all(residuals[size - k:] <= bound[size - k:])
  # After an invariant subspace (beta_i = 0) the run goes on in its
  # complement, where larger eigenvalues may hide, and the pairs found so
  # far all have zero residuals. So never stop on the step that finds one
  # (unless the space is exhausted), and afterwards only once the newest
  # block's own largest Ritz pair has converged too (without a restart that
  # is the largest pair, one of the wanted ones).
  fresh = (beta[n - 1] != 0) | (n >= dim)
  splits = (index[:-1] < n - 1) & (beta[:-1] == 0)
  first = jnp.max(jnp.where(splits, index[:-1] + 1, 0), initial=0)
  rows = ((index >= first) & (index < n))[:, None]
  in_block = active & (jnp.sum(jnp.where(rows, s ** 2, 0), axis=0) > 0.5)
  top = jnp.argmax(jnp.where(in_block, theta, -jnp.inf))
  block = ~jnp.any(in_block) | (residuals[top] <= bound[top])
  return (n >= k) & wanted & fresh & block


def _bucket_sizes(num_steps: int) -> list[int]:
  sizes, size = [], _SMALLEST_BUCKET
  while size < num_steps:
    sizes.append(size)
    size *= 4
  return sizes + [num_steps]


@functools.partial(jax.jit, static_argnames=("k",))
def converged(alpha: jax.Array, beta: jax.Array, n: Any, k: int,
              tol: Any, dim: Any) -> jax.Array:
  """Whether the `k` largest Ritz pairs after `n` steps meet `tol`.

  A pair is converged when its residual is at most `tol` times its own
  |Ritz value| plus 100 epsilons of the largest (not `tol` times the
  largest alone: a Ritz value inside the spectrum could pass that while a
  larger eigenvalue is still unseen); after a restart (an invariant
  subspace found), also the largest pair of the newest block, since the
  complement of the subspace may hold larger eigenvalues. `dim` is the
  dimension of the space. The check runs every step, so the
  eigendecomposition is of the smallest leading block of T of 8, 32, 128...
  rows that holds the `n` steps (on a CPU about 0.05 ms for 32 x 32, 0.8 ms
  for 100 x 100: more than a small model's Hessian-vector product).
  """
  return _on_leading_block(
      lambda size, a, b, n: _converged_at_size(a[:size], b[:size], n, k, tol,
                                               dim),
      alpha.shape[0], n, alpha, beta, n)


def lanczos_until_converged(matvec: Callable[[list], list], v0: list,
                            max_steps: int, k: int, tol: Any, loops: _loops.Loops, *,
                            dim: Optional[int] = None
                            ) -> tuple[Krylov, jax.Array, jax.Array]:
  """Lanczos steps until the `k` largest Ritz pairs meet `tol`.

  Returns `(run, steps taken, converged)`; at most `max_steps` steps, fewer
  if a product is not finite (the run is then NaN and not converged).
  `dim` is the dimension of the space the operator acts on (by default the
  size of the vectors; less when they are masked).
  """
  if dim is None:
    dim = dimension(v0)
  def cond(carry):
    state, n, done = carry
    return _running(n, done, max_steps, state.alpha)

  def body(carry):
    state, n, _ = carry
    return _step_and_check(state, n, matvec(row(state.basis, n)), k, tol,
                           dim)

  state = start(v0, max_steps)
  init = (state, jnp.zeros_like(state.restarts),
          jnp.zeros_like(state.restarts, dtype=bool))
  return loops.while_loop(cond, body, init)


@jax.jit
def _running(n, done, max_steps, alpha):
  # A NaN product would make every later step NaN too: stop there.
  finite = (n == 0) | jnp.isfinite(alpha[jnp.maximum(n - 1, 0)])
  return (n < max_steps) & jnp.logical_not(done) & finite


@functools.partial(jax.jit, static_argnames=("k", "dim"))
def _step_and_check(state, n, w, k, tol, dim):
  state = absorb(state, n, w)
  return state, n + 1, converged(state.alpha, state.beta, n + 1, k, tol, dim)


@functools.partial(jax.jit, static_argnames=("k",))
def top_pairs(state: Krylov, n: Any, k: int):
  """`(theta, vectors, residuals)` of the `k` largest Ritz pairs, descending.

  `vectors` has one array per leaf, shape `(k, *leaf.shape)`.
  """
  theta, s, residuals = ritz(state.alpha, state.beta, n)
  s = s[:, ::-1][:, :k]
  rows = state.alpha.shape[0]
  vectors = combine(s.T, [v[:rows] for v in state.basis])
  return theta[::-1][:k], vectors, residuals[::-1][:k]


@jax.jit
def quadrature(state: Krylov) -> tuple[jax.Array, jax.Array]:
  """Gauss quadrature of the run's start vector: `(nodes, weights)`."""
  theta, s, _ = ritz(state.alpha, state.beta, state.alpha.shape[0])
  return theta, s[0] ** 2
