"""Hutchinson estimator against exact Hessians from jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import adahessian_optax as aho
from adahessian_optax import _probes


def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  return jnp.mean((out[:, 0] - y) ** 2)


def _mlp_problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  params = {
      "w1": jax.random.normal(k1, (3, 4)),
      "b1": jax.random.normal(k2, (4,)) * 0.1,
      "w2": jax.random.normal(k3, (4, 1)),
      "b2": jnp.zeros((1,)),
  }
  x = jax.random.normal(k4, (16, 3))
  y = jnp.sin(x[:, 0])
  return params, (lambda p: _mlp_loss(p, x, y))


def _exact_hessian(loss, params):
  flat, unravel = ravel_pytree(params)
  hess = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
  return hess, unravel


@pytest.mark.slow  # 4000 estimates per distribution
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_mean_over_keys_matches_exact_diagonal(distribution):
  params, loss = _mlp_problem()
  hess, _ = _exact_hessian(loss, params)
  assert np.abs(hess - np.diag(np.diag(hess))).max() > 0.1  # non-separable
  n_keys = 4000
  keys = jax.random.split(jax.random.key(7), n_keys)
  estimates = jax.jit(jax.vmap(
      lambda k: ravel_pytree(aho.hutchinson_diagonal(
          loss, params, k, distribution=distribution).diagonal)[0]))(keys)
  estimates = np.asarray(estimates, np.float64)
  mean = estimates.mean(axis=0)
  # Per-entry variance of z_i (Hz)_i: sum_{j!=i} H_ij^2 for Rademacher; the
  # Gaussian probe adds 2 H_ii^2. Allow 5 standard errors.
  off = (hess ** 2).sum(axis=1) - np.diag(hess) ** 2
  var = off if distribution == "rademacher" else off + 2 * np.diag(hess) ** 2
  tol = 5 * np.sqrt(var / n_keys) + 1e-5
  np.testing.assert_array_less(np.abs(mean - np.diag(hess)), tol)
  # The sample variance agrees with the formula too (within 25%).
  np.testing.assert_allclose(estimates.var(axis=0), var, rtol=0.25, atol=1e-4)


def test_one_probe_is_exact_on_separable_loss():
  a = {"u": jnp.array([1.0, -2.0, 3.0]), "v": jnp.array([[0.5, 4.0]])}
  params = {"u": jnp.array([0.3, 1.0, -1.0]), "v": jnp.array([[2.0, -1.0]])}
  loss = lambda p: sum(jnp.sum(a[k] * p[k] ** 4 / 12 + p[k] ** 2) for k in p)
  result = aho.hutchinson_diagonal(loss, params, key=3)
  for k in params:
    want = np.asarray(a[k] * params[k] ** 2 + 2.0)
    np.testing.assert_allclose(result.diagonal[k], want, rtol=1e-6)
  np.testing.assert_allclose(result.value, loss(params), rtol=1e-6)
  for k in params:
    np.testing.assert_allclose(result.grad[k], jax.grad(loss)(params)[k],
                               rtol=1e-6)


@pytest.mark.parametrize("n_samples", [1, 3])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_probes_batched_and_averaged_signed(n_samples, distribution):
  params, loss = _mlp_problem()
  hess, _ = _exact_hessian(loss, params)
  key = jax.random.key(11)
  got = aho.hutchinson_diagonal(loss, params, key, n_samples=n_samples,
                                distribution=distribution)
  # Reference: the same probes (from the probe half of the key's split),
  # z * (H z) with the exact Hessian in NumPy.
  leaves = jax.tree.leaves(params)
  _, probe_key = _probes.split(jax.random.key_data(key))
  want = 0.0
  for z in _probes.SAMPLERS[distribution](probe_key, leaves, n_samples):
    z = np.asarray(ravel_pytree(z)[0], np.float64)
    want = want + z * (hess @ z) / n_samples
  np.testing.assert_allclose(ravel_pytree(got.diagonal)[0], want, rtol=2e-4,
                             atol=1e-5)


def test_every_leaf_gets_its_own_probe():
  params = {"a": jnp.zeros((64,)), "b": jnp.zeros((64,))}
  loss = lambda p: 0.5 * (jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2))
  d = aho.hutchinson_diagonal(loss, params, 0, distribution="gaussian").diagonal
  assert not np.allclose(d["a"], d["b"])


def test_integer_bool_and_none_leaves_pass_through():
  params = {"w": jnp.array([1.0, 2.0]), "step": jnp.array(3, jnp.int32),
            "flag": jnp.array(True), "empty": None}
  loss = lambda p: jnp.sum(p["w"] ** 2) * p["step"].astype(jnp.float32)
  result = aho.hutchinson_diagonal(loss, params, key=0)
  np.testing.assert_allclose(result.diagonal["w"], [6.0, 6.0])
  assert result.diagonal["step"].dtype == jnp.int32
  assert int(result.diagonal["step"]) == 0
  assert result.diagonal["empty"] is None
  assert jax.tree.structure(result.grad) == jax.tree.structure(params)


def test_axis_name_averages_over_replicas():
  n = jax.local_device_count()
  assert n >= 2
  x = jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3)
  params = jnp.array([1.0, -1.0, 2.0])

  def local(x_local):
    loss = lambda p: jnp.sum(x_local * p ** 4) / 12
    return aho.hutchinson_diagonal(loss, params, 5, axis_name="d").diagonal

  got = jax.pmap(local, axis_name="d")(x)
  want = np.mean(np.asarray(x), axis=0) * np.asarray(params) ** 2
  for replica in np.asarray(got):
    np.testing.assert_allclose(replica, want, rtol=1e-6)


@pytest.mark.standard_promotion
def test_estimator_transformation_with_sophia():
  target = jnp.array([1.0, -2.0, 3.0])
  curv = jnp.array([1.0, 10.0, 100.0])
  loss = lambda p: 0.5 * jnp.sum(curv * (p - target) ** 2)
  est = aho.hutchinson_estimator(key=0)
  params = jnp.zeros(3)
  state = est.init(params)
  diag, state2 = est.update(None, state, params, obj_fn=loss)
  np.testing.assert_allclose(diag, curv)
  assert not np.array_equal(state.key, state2.key)

  tx = optax.contrib.sophia(0.05, hessian_diagonal_fn=aho.hutchinson_estimator(
      key=0), weight_decay=0.0, update_interval=1)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, obj_fn=loss))
  for _ in range(500):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params, target, atol=5e-3)


@pytest.mark.standard_promotion  # optax.contrib.sophia
@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the convolutions are rewritten on XLA:CPU only")
def test_estimator_inside_sophias_cond_has_fast_convolutions(monkeypatch):
  """Sophia refreshes inside its own lax.cond: there the estimator's
  convolutions are in XLA:CPU's fast layout, with the same numbers."""
  from adahessian_optax import _xla_cpu  # pylint: disable=import-outside-toplevel
  k1, k2 = jax.random.split(jax.random.key(3))
  params = jax.random.normal(k1, (3, 3, 2, 3)) * 0.3
  x = jax.random.normal(k2, (2, 5, 5, 2))

  def loss(k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(y) ** 2)

  est = aho.hutchinson_estimator(key=4)
  diag, _ = jax.jit(lambda p, s: est.update(None, s, p, obj_fn=loss))(
      params, est.init(params))
  np.testing.assert_allclose(
      diag, aho.hutchinson_diagonal(loss, params, 4).diagonal, rtol=1e-5,
      atol=1e-7)

  def run():
    tx = optax.contrib.sophia(0.05, update_interval=2,
                              hessian_diagonal_fn=aho.hutchinson_estimator(
                                  key=0))
    fn = lambda p, s: tx.update(jax.grad(loss)(p), s, p, obj_fn=loss)
    convs = [n for within, n in _xla_cpu.convolutions(
        jax.make_jaxpr(fn)(params, tx.init(params)).jaxpr)
             if "cond" in within]
    step, p, s = jax.jit(fn), params, tx.init(params)
    for _ in range(3):
      u, s = step(p, s)
      p = optax.apply_updates(p, u)
    return convs, p

  convs, got = run()
  assert len(convs) >= 3 and all(
      n == _xla_cpu._canonical_numbers(4)  # pylint: disable=protected-access
      for n in convs)
  monkeypatch.setattr(_xla_cpu, "call", lambda fn, *args, **kw: fn(*args))
  convs, want = run()
  assert any(n != _xla_cpu._canonical_numbers(4) for n in convs)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_bad_inputs_are_named():
  params = jnp.ones(2)
  with pytest.raises(ValueError, match="params"):
    aho.hutchinson_diagonal(lambda p: jnp.sum(p), None, 0)
  with pytest.raises(TypeError, match="callable"):
    aho.hutchinson_diagonal(3.0, params, 0)
  with pytest.raises(ValueError, match="scalar"):
    aho.hutchinson_diagonal(lambda p: p, params, 0)
  with pytest.raises(TypeError, match="tuple"):
    aho.hutchinson_diagonal(lambda p: (jnp.sum(p), 1), params, 0)
  with pytest.raises(TypeError, match="floating"):
    aho.hutchinson_diagonal(lambda p: jnp.sum(p).astype(jnp.int32), params, 0)
  with pytest.raises(ValueError, match="distribution"):
    aho.hutchinson_diagonal(jnp.sum, params, 0, distribution="uniform")
  with pytest.raises(ValueError, match="n_samples"):
    aho.hutchinson_diagonal(jnp.sum, params, 0, n_samples=0)
  with pytest.raises(ValueError, match="key"):
    aho.hutchinson_estimator()
  with pytest.raises(ValueError, match="obj_fn"):
    est = aho.hutchinson_estimator(key=0)
    est.update(None, est.init(params), params)
