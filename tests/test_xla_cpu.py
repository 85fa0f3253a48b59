"""Convolutions rewritten to XLA:CPU's fast layout (adahessian_optax._xla_cpu)."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import adahessian_optax as aho
from adahessian_optax import _xla_cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the rewrite applies on CPU only")


def _convs(jaxpr) -> list:
  """The dimension numbers of every convolution, nested ones included."""
  return [n for _, n in _xla_cpu.convolutions(jaxpr)]


def _conv(x, w, numbers, **kw):
  return jax.lax.conv_general_dilated(x, w, (1,) * (x.ndim - 2), "SAME",
                                      dimension_numbers=numbers, **kw)


def _cnn_loss(params, x, numbers=("NHWC", "HWIO", "NHWC")):
  h = jnp.tanh(_conv(x, params["c1"], numbers))
  h = jnp.tanh(jax.jit(functools.partial(_conv, numbers=numbers))(
      h, params["c2"]))  # a nested jit: inlined
  return jnp.mean(h ** 2) + jnp.sum(params["c1"] ** 3)


def _params_and_input(numbers):
  keys = jax.random.split(jax.random.key(0), 3)
  if numbers[0] == "NCHW":
    x, c1, c2 = (2, 3, 5, 5), (4, 3, 3, 3), (4, 4, 3, 3)
  else:
    x, c1, c2 = (2, 5, 5, 3), (3, 3, 3, 4), (3, 3, 4, 4)
  return ({"c1": 0.5 * jax.random.normal(keys[0], c1),
           "c2": 0.5 * jax.random.normal(keys[1], c2)},
          jax.random.normal(keys[2], x))


def test_hvp_is_unchanged_and_every_convolution_canonical():
  # PyTorch's layout: even the forward convolutions are not canonical.
  numbers = ("NCHW", "OIHW", "NCHW")
  params, x = _params_and_input(numbers)
  loss = functools.partial(_cnn_loss, x=x, numbers=numbers)
  v = jax.tree.map(jnp.ones_like, params)
  hvp = lambda v: jax.jvp(jax.grad(loss), (params,), (v,))[1]
  plain = jax.make_jaxpr(hvp)(v)
  rewritten = jax.make_jaxpr(functools.partial(_xla_cpu.call, hvp))(v)
  canonical = _xla_cpu._canonical_numbers(4)  # pylint: disable=protected-access
  # The backward pass's convolutions have permuted dimension numbers ...
  assert any(n != canonical for n in _convs(plain.jaxpr))
  # ... and none is left after the rewrite (the nested jit inlined).
  assert _convs(rewritten.jaxpr)
  assert all(n == canonical for n in _convs(rewritten.jaxpr))
  expected = jax.jit(hvp)(v)
  got = jax.jit(functools.partial(_xla_cpu.call, hvp))(v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_convolutions_inside_control_flow_are_rewritten():
  params, x = _params_and_input(("NHWC", "HWIO", "NHWC"))

  def loss(p, flag):
    grad = jax.grad(lambda p: _cnn_loss(p, x))
    g = jax.lax.cond(flag, grad, lambda p: jax.tree.map(jnp.zeros_like, p), p)
    _, hs = jax.lax.scan(lambda c, _: (c, grad(p)["c1"]), 0.0, None, length=2)
    return g, hs

  rewritten = jax.make_jaxpr(functools.partial(_xla_cpu.call, loss))(
      params, True)
  canonical = _xla_cpu._canonical_numbers(4)  # pylint: disable=protected-access
  assert len(_convs(rewritten.jaxpr)) >= 6
  assert all(n == canonical for n in _convs(rewritten.jaxpr))
  for a, b in zip(jax.tree.leaves(jax.jit(functools.partial(
      _xla_cpu.call, loss))(params, True)), jax.tree.leaves(jax.jit(loss)(params, True))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_strided_1d_convolution():
  x = jax.random.normal(jax.random.key(1), (2, 4, 9))  # N C W
  w = jax.random.normal(jax.random.key(2), (4, 2, 3))  # O I/groups W

  def f(w):
    y = jax.lax.conv_general_dilated(
        x, w, (2,), [(1, 1)], rhs_dilation=(2,), feature_group_count=2,
        dimension_numbers=("NCH", "OIH", "NCH"))
    return jnp.sum(jnp.sin(y))

  g = jax.grad(f)
  assert all(n == _xla_cpu._canonical_numbers(3)  # pylint: disable=protected-access
             for n in _convs(jax.make_jaxpr(
                 functools.partial(_xla_cpu.call, g))(w).jaxpr))
  np.testing.assert_allclose(jax.jit(functools.partial(_xla_cpu.call, g))(w),
                             jax.jit(g)(w), rtol=1e-5, atol=1e-6)


def test_without_convolutions_the_trace_is_kept():
  f = lambda a: jnp.sin(a) @ a.T
  a = jnp.arange(6.0).reshape(2, 3)
  assert str(jax.make_jaxpr(functools.partial(_xla_cpu.call, f))(a)) == str(
      jax.make_jaxpr(f)(a))


def test_eigenvalues_under_jit_of_a_cnn_match_eigvalsh():
  params, x = _params_and_input(("NHWC", "HWIO", "NHWC"))
  loss = functools.partial(_cnn_loss, x=x)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  exact = np.linalg.eigvalsh(np.asarray(
      jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64))
  got = jax.jit(lambda p: aho.hessian_eigenvalues(
      loss, p, jax.random.key(0), k=2, tol=1e-6).values)(params)
  np.testing.assert_allclose(got, exact[::-1][:2], rtol=1e-4)
