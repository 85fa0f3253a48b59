"""The Lanczos core on explicit matrices, against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from adahessian_optax import _loops
from adahessian_optax.algorithms import _lanczos
from adahessian_optax import _tree

SHAPES = ((3, 4), (28,))  # a vector of 40 entries as two leaves


def _split(v):
  return [v[:12].reshape(3, 4), v[12:]]


def _join(leaves):
  return jnp.concatenate([x.reshape(-1) for x in leaves])


def _symmetric(n, seed):
  a = np.random.default_rng(seed).normal(size=(n, n))
  return (a + a.T) / 2


def _matvec(a):
  a = jnp.asarray(a, jnp.float32)
  return lambda leaves: _split(a @ _join(leaves))


def _run(a, num_steps, loops=_loops.TRACED, seed=0):
  v0 = _split(jnp.asarray(np.random.default_rng(seed).choice([-1.0, 1.0], 40),
                          jnp.float32))
  return _lanczos.lanczos(_matvec(a), v0, num_steps, loops)


def _basis(state, rows):
  return np.stack([np.asarray(_join([v[i] for v in state.basis]), np.float64)
                   for i in range(rows)])


M = 30


@pytest.fixture(scope="module")
def run():
  """30 steps on a random symmetric 40 x 40 matrix (no gap to speak of)."""
  a = _symmetric(40, 0)
  return a, _run(a, M)


def test_basis_orthonormal_and_tridiagonal_projection(run):
  a, state = run
  v = _basis(state, M + 1)
  np.testing.assert_allclose(v @ v.T, np.eye(M + 1), atol=2e-6)
  t = (np.diag(state.alpha) + np.diag(state.beta[:-1], 1)
       + np.diag(state.beta[:-1], -1))
  # V^T A V = T: the three-term recurrence, and all other couplings vanish.
  np.testing.assert_allclose(v[:M] @ a @ v[:M].T, t, atol=2e-5)
  # The step after the last couples to v_{m+1} with beta_m.
  np.testing.assert_allclose(v[M] @ a @ v[M - 1], state.beta[-1], rtol=1e-4)


def test_ritz_residuals_are_true_residuals(run):
  a, state = run
  n = 15  # the first 15 steps of the run are a 15-step run
  theta, s, residuals = _lanczos.ritz(state.alpha, state.beta, n)
  y = np.asarray(s, np.float64).T @ _basis(state, M)  # Ritz vectors, rows
  active = slice(M - n, M)
  true = np.linalg.norm(y @ a - np.asarray(theta)[:, None] * y, axis=1)
  np.testing.assert_allclose(residuals[active], true[active], rtol=1e-3,
                             atol=1e-5)
  assert true[active].max() > 0.1  # not yet converged: the check sees a range


def test_breakdown_restarts_and_recovers_multiplicities():
  # Three distinct eigenvalues: from one start vector the Krylov space has
  # dimension 3; the run restarts (beta = 0) and finds every copy.
  q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(40, 40)))
  eig = np.repeat([1.0, 2.0, 5.0], [20, 10, 10])
  state = _run(q @ np.diag(eig) @ q.T, 40)
  assert np.sum(np.asarray(state.beta) == 0) >= 3
  assert state.beta[2] == 0
  theta = _lanczos.ritz(state.alpha, state.beta, 40)[0]
  np.testing.assert_allclose(np.sort(theta), eig, atol=1e-4)


@pytest.mark.parametrize("n", [3, 8, 9, 16, 17, 30])
def test_converged_checks_the_leading_block_at_every_size(run, n):
  _, state = run
  alpha, beta = np.asarray(state.alpha, np.float64), np.asarray(
      state.beta, np.float64)
  t = np.diag(alpha[:n]) + np.diag(beta[:n - 1], 1) + np.diag(beta[:n - 1], -1)
  theta, s = np.linalg.eigh(t)
  # The masked matrix (padded to 30 or to a power-of-two block) has the
  # block's Ritz values on top.
  np.testing.assert_allclose(
      _lanczos.ritz(state.alpha, state.beta, n)[0][30 - n:], theta, atol=1e-5)
  # Each wanted pair against its own |theta|, plus a rounding-level floor.
  residuals = np.abs(beta[n - 1] * s[-1, -2:])
  floor = 100 * np.finfo(np.float32).eps * np.abs(theta).max()
  needed = np.max((residuals - floor) / np.abs(theta[-2:]))
  cases = [(n + 1, 1.0, False)]
  if needed > 0:
    cases += [(2, 1.01 * needed, True), (2, 0.99 * needed, False)]
  else:  # below the floor: converged at any tolerance
    cases += [(2, 1e-12, True)]
  for k, tol, want in cases:
    got = _lanczos.converged(state.alpha, state.beta, n, k, tol, 40)
    assert bool(got) == want, (k, tol)


def test_mixed_dtypes_accumulate_in_float32():
  leaves = [jnp.ones((4,), jnp.bfloat16), jnp.full((3,), 2.0, jnp.float32)]
  wide = _tree.widen(leaves)
  assert [x.dtype for x in wide] == [jnp.float32, jnp.float32]
  dots = _lanczos.leaf_dots(wide, wide)
  assert dots.dtype == jnp.float32
  np.testing.assert_allclose(dots, [4.0, 12.0])
  state = _lanczos.start([jnp.full((2,), 1.0, jnp.bfloat16)], 3)
  assert state.basis[0].dtype == jnp.float32
  assert state.basis[0].shape == (4, 2)
