"""The GGN operator and its losses against J^T H_l J from jax.jacobian."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import adahessian_optax as aho


def _mlp(n=12):
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(3, 5)) / np.sqrt(3),
            "b1": 0.1 * rng.normal(size=(5,)),
            "w2": rng.normal(size=(5, 3))}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, n))
  return params, x, y


def _logits(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _exact_ggn(output_fn, output_loss, params):
  """J^T (d^2 l / d f^2) J in float64, from jax.jacobian and jax.hessian."""
  flat, unravel = ravel_pytree(params)
  out = output_fn(params)
  jac = jax.jit(jax.jacobian(lambda f: output_fn(unravel(f)).reshape(-1)))(
      flat)
  h_out = jax.jit(jax.hessian(lambda o: output_loss(o.reshape(out.shape))))(
      out.reshape(-1))
  jac, h_out = np.asarray(jac, np.float64), np.asarray(h_out, np.float64)
  return jac.T @ h_out @ jac


@pytest.fixture(scope="module")
def mlp_ggn():
  params, x, y = _mlp()
  loss = aho.SoftmaxCrossEntropy(y)
  return params, x, y, _exact_ggn(lambda p: _logits(p, x), loss, params)


def test_losses_match_optax():
  params, x, y = _mlp()
  logits = _logits(params, x)
  np.testing.assert_allclose(
      aho.SoftmaxCrossEntropy(y)(logits),
      optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
      rtol=1e-6)
  np.testing.assert_allclose(
      aho.SoftmaxCrossEntropy(jax.nn.one_hot(y, 3))(logits),
      optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
      rtol=1e-6)
  np.testing.assert_allclose(aho.SquaredError(y.astype(jnp.float32))(logits[:, 0]),
                             optax.l2_loss(logits[:, 0], y.astype(jnp.float32)).mean(),
                             rtol=1e-6)


@pytest.mark.parametrize(
    "jit", [pytest.param(False, marks=pytest.mark.slow), True])
def test_eigenvalues_trace_match_exact_ggn(mlp_ggn, jit):
  params, x, y, ggn = mlp_ggn
  exact = np.linalg.eigvalsh(ggn)
  assert exact.min() > -1e-6  # PSD
  loss = lambda p: aho.ggn(lambda q: _logits(q, x), aho.SoftmaxCrossEntropy(y))

  def run(p):
    top = aho.hessian_eigenvalues(loss(p), p, 0, k=3)
    low = aho.hessian_eigenvalues(loss(p), p, 0, which="smallest")
    trace = aho.hessian_trace(loss(p), p, 1, n_samples=60)
    return top.values, low.values, trace.estimate, trace.stderr

  top, low, trace, stderr = (jax.jit(run) if jit else run)(params)
  np.testing.assert_allclose(top, exact[::-1][:3], rtol=1e-3)
  assert float(low[0]) > -1e-4 * exact.max()  # PSD: nothing below zero
  assert abs(float(trace) - np.trace(ggn)) < 5 * float(stderr) + 1e-5


def test_ggn_is_the_hessian_for_a_linear_model():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 10))
  w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  # (SquaredError with a linear model is the Hessian too; the test of the
  # operator against the exact GGN covers it.)
  for output_loss in (aho.SoftmaxCrossEntropy(y),):
    loss = aho.ggn(lambda v: x @ v, output_loss)
    exact = np.linalg.eigvalsh(np.asarray(
        jax.hessian(lambda v: loss(v.reshape(4, 3)))(w.reshape(-1)),
        np.float64))
    got = aho.hessian_eigenvalues(loss, w, 0, k=4, n_steps=12).values
    np.testing.assert_allclose(got, exact[::-1][:4], rtol=1e-4, atol=1e-6)


def test_dataset_ggn_weights_batches_by_size(mlp_ggn):
  params, x, y, ggn = mlp_ggn
  output_fn = lambda p, b: _logits(p, b[0])
  output_loss = lambda o, b: aho.SoftmaxCrossEntropy(b[1])(o)
  batches = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
  data = aho.DatasetLoss(aho.ggn(output_fn, output_loss), batches)
  top = aho.hessian_eigenvalues(data, params, 0).values
  np.testing.assert_allclose(top, np.linalg.eigvalsh(ggn)[-1:], rtol=1e-3)


def test_ggn_axis_name_averages_over_replicas(mlp_ggn):
  params, x, y, ggn = mlp_ggn
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")

  def top(xb, yb):
    loss = aho.ggn(lambda p: _logits(p, xb), aho.SoftmaxCrossEntropy(yb))
    return aho.hessian_eigenvalues(loss, params, 0, axis_name="d").values

  got = jax.pmap(top, axis_name="d")(x.reshape(4, 3, 3), y.reshape(4, 3))
  for replica in np.asarray(got):
    np.testing.assert_allclose(replica, np.linalg.eigvalsh(ggn)[-1:],
                               rtol=1e-3)


def test_bad_inputs_are_named():
  params, x, y = _mlp()
  with pytest.raises(TypeError, match="output_fn must be a callable"):
    aho.ggn(3, aho.SoftmaxCrossEntropy(y))
  with pytest.raises(TypeError, match="output_loss must be a callable"):
    aho.ggn(lambda p: p, None)
  with pytest.raises(ValueError, match="integer labels of shape"):
    aho.SoftmaxCrossEntropy(y[:3])(_logits(params, x))
  with pytest.raises(ValueError, match="targets of shape"):
    aho.SquaredError(jnp.zeros(3))(jnp.zeros(4))
  pair = aho.ggn(lambda p: (_logits(p, x), 0), aho.SoftmaxCrossEntropy(y))
  with pytest.raises(TypeError, match="one array of outputs"):
    aho.hessian_eigenvalues(pair, params, 0)


@pytest.mark.slow  # a sharded compile on 4 devices
def test_ggn_with_sharded_params_and_batch(mlp_ggn):
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  params, x, y, ggn = mlp_ggn
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,))
  params = jax.device_put(params, {
      "w1": NamedSharding(mesh, P(None, None)),
      "b1": NamedSharding(mesh, P(None)),
      "w2": NamedSharding(mesh, P(None, None))})
  x, y = jax.device_put((x, y), NamedSharding(mesh, P("d")))

  def top(p, x, y):
    loss = aho.ggn(lambda q: _logits(q, x), aho.SoftmaxCrossEntropy(y))
    return aho.hessian_eigenvalues(loss, p, 0, k=2)

  for fn in (top, jax.jit(top)):
    got = fn(params, x, y)
    np.testing.assert_allclose(got.values, np.linalg.eigvalsh(ggn)[::-1][:2],
                               rtol=1e-3)
