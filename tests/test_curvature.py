"""The curvature core: Hessian-vector products and the sub-batch closure."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import adahessian_optax as aho
from adahessian_optax.operators import _base
from adahessian_optax import _probes
from adahessian_optax import _tree


def _mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def _problem(n=12):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {"w1": jax.random.normal(k1, (3, 4)),
            "b1": jax.random.normal(k2, (4,)) * 0.1,
            "w2": jax.random.normal(k3, (4,)),
            "steps": jnp.int32(2)}  # a non-float leaf: no tangent
  x = jax.random.normal(k4, (n, 3))
  return params, (x, jnp.sin(x[:, 0]))


def _exact_hessian(loss, params):
  split = _tree.FloatLeaves.of(params)
  flat, unravel = ravel_pytree(split.select(params))
  hess = jax.hessian(lambda f: loss(split.replace(params, unravel(f))))(flat)
  return np.asarray(hess, np.float64), unravel


def _float_grad(loss, params):
  """jax.grad with respect to the float leaves (the int leaf held fixed)."""
  floats = {k: v for k, v in params.items() if k != "steps"}
  return jax.grad(lambda f: loss({**params, **f}))(floats)


def _flat(leaves):
  return np.asarray(ravel_pytree(leaves)[0], np.float64)


def test_products_against_jax_hessian():
  params, batch = _problem()
  loss = functools.partial(_mlp_loss, batch=batch)
  hess, unravel = _exact_hessian(loss, params)
  leaves = _tree.FloatLeaves.of(params).select(params)
  vs = _probes.gaussian(jax.random.key_data(jax.random.key(1)), leaves, 2)
  space = _base.Space.of(params)
  value, grad, hv = aho.Hessian(loss).products(params, space, [vs[0]],
                                               lambda ts, hs: hs[0])
  np.testing.assert_allclose(value, loss(params), rtol=1e-6)
  want_grad = _float_grad(loss, params)
  np.testing.assert_allclose(
      _flat(grad), _flat([want_grad[k] for k in ("b1", "w1", "w2")]),
      rtol=1e-5)
  np.testing.assert_allclose(_flat(hv), hess @ _flat(vs[0]), rtol=1e-4,
                             atol=1e-6)
  value2, grad2, hvp = aho.Hessian(loss).linearize(params, space)
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  np.testing.assert_allclose(_flat(grad2), _flat(grad), rtol=1e-6)
  for v in vs:
    np.testing.assert_allclose(_flat(hvp(v)), hess @ _flat(v), rtol=1e-4,
                               atol=1e-6)


def test_sub_batch_closure_is_the_whole_batch_loss():
  params, batch = _problem(12)
  value_fn = aho.sub_batch_value_fn(_mlp_loss, batch, fraction=0.25)
  assert value_fn.size == 3
  np.testing.assert_allclose(value_fn(params), _mlp_loss(params, batch),
                             rtol=1e-6)
  want = _float_grad(functools.partial(_mlp_loss, batch=batch), params)
  for k, g in _float_grad(value_fn, params).items():
    np.testing.assert_allclose(g, want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_sub_batch_products_are_the_sub_batch_hessian(n_samples):
  params, batch = _problem(12)
  value_fn = aho.sub_batch_value_fn(_mlp_loss, batch, fraction=1 / 3)
  head = jax.tree.map(lambda x: x[:4], batch)
  hess_head, _ = _exact_hessian(functools.partial(_mlp_loss, batch=head),
                                params)
  hess_full, _ = _exact_hessian(functools.partial(_mlp_loss, batch=batch),
                                params)
  assert np.abs(hess_head - hess_full).max() > 0.05  # they really differ
  key = jax.random.key(4)
  got = aho.hutchinson_diagonal(value_fn, params, key, n_samples=n_samples)
  # Value and gradient: the whole batch's, exactly.
  np.testing.assert_allclose(got.value, _mlp_loss(params, batch), rtol=1e-6)
  full_grad = _float_grad(functools.partial(_mlp_loss, batch=batch), params)
  for k in ("w1", "b1", "w2"):
    np.testing.assert_allclose(got.grad[k], full_grad[k], rtol=1e-5,
                               atol=1e-7)
  # The estimate: z * (H_head z) for the same probes, H_head exact.
  leaves = _tree.FloatLeaves.of(params).select(params)
  _, probe_key = _probes.split(jax.random.key_data(key))
  want = 0.0
  for z in _probes.rademacher(probe_key, leaves, n_samples):
    z = _flat(z)
    want = want + z * (hess_head @ z) / n_samples
  split = _tree.FloatLeaves.of(params)
  np.testing.assert_allclose(_flat(split.select(got.diagonal)), want,
                             rtol=1e-4, atol=1e-5)


def test_sub_batch_fused_and_plain_steps_agree():
  params, batch = _problem(16)
  params.pop("steps")
  value_fn = aho.sub_batch_value_fn(_mlp_loss, batch, fraction=0.25)
  tx = aho.adahessian(0.1, key=3)

  @jax.jit
  def fused(p, s):
    _, g, h = aho.value_grad_and_hessian(value_fn, p, s)
    u, s = tx.update(g, s, p, hessian=h)
    return optax.apply_updates(p, u), s

  @jax.jit
  def plain(p, s):
    u, s = tx.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn)
    return optax.apply_updates(p, u), s

  pa, sa = params, tx.init(params)
  pb, sb = params, tx.init(params)
  for _ in range(4):
    pa, sa = fused(pa, sa)
    pb, sb = plain(pb, sb)
  for x, y in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb))):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


def test_whole_fraction_is_the_plain_closure():
  params, batch = _problem(8)
  value_fn = aho.sub_batch_value_fn(_mlp_loss, batch, fraction=1.0)
  a = aho.hutchinson_diagonal(value_fn, params, 2)
  b = aho.hutchinson_diagonal(lambda p: _mlp_loss(p, batch), params, 2)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_sub_batch_errors():
  params, batch = _problem(8)
  for bad in (0, 0.0, -0.5, 1.5, True, "half", jnp.float32(0.5)):
    with pytest.raises(ValueError, match="fraction must be a number"):
      aho.sub_batch_value_fn(_mlp_loss, batch, bad)
  with pytest.raises(ValueError, match="leading"):
    aho.sub_batch_value_fn(_mlp_loss, (batch[0], batch[1][:5]), 0.5)
  with pytest.raises(ValueError, match="leading"):
    aho.sub_batch_value_fn(_mlp_loss, (batch[0], jnp.float32(1.0)), 0.5)
  with pytest.raises(TypeError, match="loss_fn must be a callable"):
    aho.sub_batch_value_fn("loss", batch, 0.5)
  del params


def _chunk_problem(conv):
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  if conv:
    params = {"k": jax.random.normal(k1, (3, 3, 2, 3)) * 0.3,
              "w": jax.random.normal(k2, (3,))}
    x = jax.random.normal(k3, (8, 5, 5, 2))

    def loss(p, x):
      h = jax.lax.conv_general_dilated(
          x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.mean(jnp.tanh(h).mean((1, 2)) @ p["w"] ** 2)
  else:
    params = {"w1": jax.random.normal(k1, (4, 16)) * 0.5,
              "w2": jax.random.normal(k2, (16,)) * 0.5}
    x = jax.random.normal(k3, (8, 4))

    def loss(p, x):
      return jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"] ** 2)
  return params, x, loss


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
@pytest.mark.parametrize("n_samples", [1, 2])
def test_chunks_give_the_same_numbers(conv, n_samples):
  from adahessian_optax import _xla_cpu  # pylint: disable=import-outside-toplevel
  params, x, loss = _chunk_problem(conv)
  whole = aho.sub_batch_value_fn(loss, x, 0.5)
  chunked = aho.sub_batch_value_fn(loss, x, 0.5, chunks=2)
  np.testing.assert_allclose(chunked(params), whole(params), rtol=1e-6)
  a = aho.hutchinson_diagonal(whole, params, 1, n_samples=n_samples)
  b = aho.hutchinson_diagonal(chunked, params, 1, n_samples=n_samples)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
  # The pieces run one after the other in a scan; on XLA:CPU its body's
  # convolutions are in the layout that runs fast inside a loop.
  jaxpr = jax.make_jaxpr(
      lambda p: aho.hutchinson_diagonal(chunked, p, 1))(params).jaxpr
  assert " scan[" in str(jaxpr)
  convs = [n for within, n in _xla_cpu.convolutions(jaxpr)
           if "scan" in within]
  assert len(convs) >= (3 if conv else 0)
  if jax.default_backend() == "cpu":
    assert all(n == _xla_cpu._canonical_numbers(4)  # pylint: disable=protected-access
               for n in convs)


def test_chunks_bound_the_memory_of_a_refresh_step():
  # An activation-heavy loss: a wide hidden layer on many examples.
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (8, 256)) * 0.3}
  x = jax.random.normal(k2, (2048, 8))
  loss = lambda p, x: jnp.mean(jnp.tanh(jnp.tanh(x @ p["w"]) ** 2))
  tx = aho.adahessian(0.1, key=0)

  def temp_bytes(chunks):
    value_fn = aho.sub_batch_value_fn(loss, x, chunks=chunks)

    def step(p, s):
      _, g, h = aho.value_grad_and_hessian(value_fn, p, s)
      return tx.update(g, s, p, hessian=h)
    compiled = jax.jit(step).lower(params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one, four = temp_bytes(1), temp_bytes(4)
  activations = 2048 * 256 * 4  # one f32 activation of the batch
  assert one > 3 * activations
  assert four < 0.5 * one


def test_chunks_are_strided_and_stay_on_their_devices():
  # Piece i holds the head's examples i, c + i, 2c + i, ...: with the batch
  # split over the devices on its leading axis, every piece keeps rows on
  # every device, so no collective moves the batch (contiguous pieces sat
  # on a few devices and were moved: collective-permutes of the examples).
  params, x, loss = _chunk_problem(False)
  value_fn = aho.sub_batch_value_fn(loss, x, chunks=2)
  weight, pieces = value_fn.head_chunks()
  assert weight == 0.5
  np.testing.assert_array_equal(pieces[0], x[0::2])
  np.testing.assert_array_equal(pieces[1], x[1::2])
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs a mesh of several devices")
  mesh = jax.make_mesh((n,), ("d",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rows = 2 * 2 * n  # two chunks, two examples of each per device
  xs = jax.device_put(jax.random.normal(jax.random.key(1), (rows, 4)),
                      jax.sharding.NamedSharding(mesh,
                                                 jax.sharding.PartitionSpec("d")))

  def estimate(p, x):
    return aho.hutchinson_diagonal(aho.sub_batch_value_fn(loss, x, chunks=2),
                                   p, 1).diagonal

  text = jax.jit(estimate).lower(params, xs).compile().as_text()
  # The params are replicated: their gradients are all-reduced, and nothing
  # else crosses devices.
  moved = re.findall(r"(?:all-gather|all-to-all|collective-permute)[-a-z]*\(",
                     text)
  assert not moved, moved
  whole = estimate(params, jax.device_get(xs))
  for u, v in zip(jax.tree.leaves(jax.jit(estimate)(params, xs)),
                  jax.tree.leaves(whole)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_chunks_must_divide_the_sub_batch():
  _, x, loss = _chunk_problem(False)
  with pytest.raises(ValueError, match="chunks=3 does not divide the 4"):
    aho.sub_batch_value_fn(loss, x, 0.5, chunks=3)
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="chunks must be an int"):
      aho.sub_batch_value_fn(loss, x, chunks=bad)
