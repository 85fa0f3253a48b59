"""Optimizers' preconditioners and stability thresholds, recomputed in NumPy."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adahessian_optax as aho


@pytest.mark.standard_promotion  # optax.adam's own bias correction
def test_adam_preconditioner_is_sqrt_vhat_plus_eps():
  grads = [np.array([0.5, -2.0]), np.array([1.5, 0.25]), np.array([-1.0, 3.0])]
  tx = optax.chain(optax.clip(10.0), optax.adamw(0.1, b2=0.9, eps=1e-3))
  params = jnp.zeros(2)
  state = tx.init(params)
  for g in grads:
    _, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
  v = np.zeros(2)
  for g in grads:
    v = 0.9 * v + 0.1 * g ** 2
  expected = np.sqrt(v / (1 - 0.9 ** 3)) + 1e-3
  np.testing.assert_allclose(aho.adam_preconditioner(state, b2=0.9, eps=1e-3),
                             expected, rtol=1e-5)


def test_adahessian_preconditioner_is_vhat_power_plus_eps():
  d = np.array([1.0, 4.0, 9.0])  # the diagonal Hutchinson gets exactly
  loss = lambda p: 0.5 * jnp.sum(jnp.asarray(d, jnp.float32) * p ** 2)
  tx = aho.adahessian(0.01, b2=0.5, eps=1e-2, hessian_power=0.5, key=0)
  params = jnp.ones(3)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss)
    params = optax.apply_updates(params, updates)
  v = (0.5 * 0.5 + 0.5) * d ** 2  # two refreshes of |D|^2 = d^2
  expected = (v / (1 - 0.5 ** 2)) ** 0.25 + 1e-2
  got = aho.adahessian_preconditioner(state, b2=0.5, hessian_power=0.5,
                                      eps=1e-2)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_thresholds_and_errors():
  assert aho.stability_threshold(0.01) == pytest.approx(200.0)
  assert aho.stability_threshold(0.01, 0.9) == pytest.approx(3800.0)
  with pytest.raises(ValueError, match="learning_rate must lie"):
    aho.stability_threshold(0.0)
  with pytest.raises(ValueError, match="no ScaleByAdamState"):
    aho.adam_preconditioner(optax.sgd(0.1).init(jnp.zeros(2)))
  two = optax.chain(optax.adam(0.1), optax.adam(0.1)).init(jnp.zeros(2))
  with pytest.raises(ValueError, match="holds 2 ScaleByAdamState"):
    aho.adam_preconditioner(two)
  with pytest.raises(ValueError, match="ScaleByAdaHessianState"):
    aho.adahessian_preconditioner(optax.adam(0.1).init(jnp.zeros(2)))


@pytest.mark.standard_promotion  # optax.adam's own bias correction
def test_preconditioner_from_an_nnx_optimizer():
  from flax import nnx
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jnp.arange(12.0).reshape(4, 3) / 10
  loss = lambda m: jnp.mean(m(x) ** 2)
  optimizer = nnx.Optimizer(model, optax.adam(0.1, eps=1e-3), wrt=nnx.Param)
  optimizer.update(model, nnx.grad(loss)(model))
  graphdef, params = nnx.split(model, nnx.Param)
  p = aho.adam_preconditioner(optimizer.opt_state, eps=1e-3)
  value_fn = lambda ps: loss(nnx.merge(graphdef, ps))
  got = aho.hessian_eigenvalues(value_fn, params, 0, k=1,
                                preconditioner=p).values
  flat_p = np.concatenate([np.ravel(v) for v in jax.tree.leaves(p)])
  flat, unravel = ravel_pytree(params)
  hess = np.asarray(jax.hessian(lambda f: value_fn(unravel(f)))(flat))
  s = 1 / np.sqrt(np.concatenate(
      [np.ravel(v) for v in jax.tree.leaves(unravel(jnp.asarray(flat_p)))]))
  np.testing.assert_allclose(
      got, np.linalg.eigvalsh(s[:, None] * hess * s)[-1:], rtol=1e-4)


@pytest.mark.standard_promotion  # optax.adam's own bias correction
def test_an_nnx_optimizers_preconditioner_is_taken_as_it_comes():
  # nnx.Optimizer boxes its state (OptVariable) where the params hold
  # Param: the operator matches the leaves by position, no re-boxing.
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  graphdef, params = nnx.split(model, nnx.Param)
  loss = lambda p: jnp.mean(jnp.tanh(nnx.merge(graphdef, p)(x)) ** 2)
  optimizer.update(model, nnx.grad(lambda m: loss(nnx.state(m, nnx.Param)))(
      model))
  params = nnx.state(model, nnx.Param)
  p = aho.adam_preconditioner(optimizer.opt_state)
  got = aho.hessian_eigenvalues(loss, params, 0, k=2, preconditioner=p)
  reboxed = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(p))
  want = aho.hessian_eigenvalues(loss, params, 0, k=2, preconditioner=reboxed)
  np.testing.assert_allclose(got.values, want.values, rtol=1e-5)
  # And against P^-1/2 H P^-1/2 built densely.
  flat, unravel = ravel_pytree(params)
  hess = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
  s = 1 / np.sqrt(np.asarray(ravel_pytree(reboxed)[0],
                             np.float64))
  np.testing.assert_allclose(
      got.values, np.linalg.eigvalsh(s[:, None] * hess * s)[::-1][:2],
      rtol=1e-4)
