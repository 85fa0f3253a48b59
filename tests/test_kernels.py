"""A model with a custom-VJP kernel (flash attention's situation): every
entry point works or names the cause and the ways out, and the three ways
out work, checked against the same model with reference attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import adahessian_optax as aho

B, T, D = 4, 6, 8


def _reference_attention(q, k, v):
  scores = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D)
  causal = jnp.tril(jnp.ones((T, T), bool))
  scores = jnp.where(causal, scores, -1e9)
  return jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), v)


@jax.custom_vjp
def _kernel_attention(q, k, v):
  """A kernel as JAX sees Pallas's or cuDNN's: a gradient, no jvp rule
  (its forward is opaque to JAX, here a host callback)."""
  return jax.pure_callback(
      lambda *a: np.asarray(_reference_attention(*a)),
      jax.ShapeDtypeStruct(q.shape, q.dtype), q, k, v)


def _kernel_fwd(q, k, v):
  return _kernel_attention(q, k, v), (q, k, v)


def _kernel_bwd(residuals, g):
  return jax.vjp(_reference_attention, *residuals)[1](g)


_kernel_attention.defvjp(_kernel_fwd, _kernel_bwd)


def _problem():
  rng = np.random.default_rng(0)
  params = {name: jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D),
                              jnp.float32) for name in ("q", "k", "v", "o")}
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, D, (B, T)))
  return params, x, y


def _logits(params, x, attention):
  h = attention(x @ params["q"], x @ params["k"], x @ params["v"])
  return jnp.tanh(h) @ params["o"]


def _losses(x, y):
  def loss(attention):
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(
        _logits(p, x, attention), y).mean()
  return loss(_kernel_attention), loss(_reference_attention)


def _exact_hessian(loss, params):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)


def test_forward_mode_fails_on_the_kernel_and_every_entry_point_says_why():
  params, x, y = _problem()
  kernel, _ = _losses(x, y)
  jax.grad(kernel)(params)  # the gradient works
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(jax.grad(kernel), (params,), (params,))
  tx = aho.adahessian(0.1, key=0)
  state = tx.init(params)
  calls = {
      "plain step": lambda p: tx.update(jax.grad(kernel)(p), state, p,
                                        value_fn=kernel),
      "fused step": lambda p: aho.value_grad_and_hessian(kernel, p, state),
      "hutchinson_diagonal": lambda p: aho.hutchinson_diagonal(kernel, p, 0),
      "hessian_eigenvalues": lambda p: aho.hessian_eigenvalues(kernel, p, 0),
      "hessian_trace": lambda p: aho.hessian_trace(kernel, p, 0),
      "hessian_spectrum": lambda p: aho.hessian_spectrum(kernel, p, 0),
      "layer_summary": lambda p: aho.layer_summary(kernel, p, 0),
      "ggn": lambda p: aho.hessian_eigenvalues(aho.ggn(
          lambda q: _logits(q, x, _kernel_attention),
          aho.SoftmaxCrossEntropy(y)), p, 0),
  }
  for name, call in calls.items():
    for fn in (call, jax.jit(call)):
      with pytest.raises(TypeError, match="custom VJP.*finite_difference"):
        fn(params)
        pytest.fail(f"{name} did not raise")


def test_a_curvature_closure_with_reference_attention_gives_the_exact_step():
  # Way out (a): the gradient through the kernel, the curvature through the
  # reference; the same numbers as the reference model alone.
  params, x, y = _problem()
  kernel, reference = _losses(x, y)
  tx = aho.adahessian(0.1, key=0)

  @functools.partial(jax.jit, static_argnums=2)
  def run(params, state, grad_loss):
    for _ in range(3):
      updates, state = tx.update(jax.grad(grad_loss)(params), state, params,
                                 value_fn=reference)
      params = optax.apply_updates(params, updates)
    return params

  got = run(params, tx.init(params), kernel)
  want = run(params, tx.init(params), reference)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, rtol", [("forward", 3e-3),
                                          ("central", 1e-3)])
def test_finite_difference_products_through_the_kernel(method, rtol):
  # Way out (b), in the analysis and in the optimizer.
  params, x, y = _problem()
  kernel, reference = _losses(x, y)
  hess = _exact_hessian(reference, params)
  op = aho.curvature_operator(aho.finite_difference(kernel, method=method),
                              params)
  v = jax.tree.map(lambda a: jnp.asarray(
      np.random.default_rng(1).normal(size=a.shape), jnp.float32), params)
  want = hess @ ravel_pytree(v)[0]
  got = np.asarray(ravel_pytree(op.matvec(v))[0], np.float64)
  assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want)
  # Hutchinson with the finite-difference products: the exact products'
  # estimate on the same probes, to the product's accuracy.
  fd = aho.hutchinson_diagonal(aho.finite_difference(kernel, method=method),
                               params, 3).diagonal
  exact = aho.hutchinson_diagonal(reference, params, 3).diagonal
  scale = max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(exact))
  for k in params:
    np.testing.assert_allclose(fd[k], exact[k], atol=20 * rtol * scale)
  tx = aho.adahessian(0.05, key=0)
  state, p = tx.init(params), params
  value_fn = aho.finite_difference(kernel, method=method)
  step = jax.jit(lambda p, s: tx.update(jax.grad(kernel)(p), s, p,
                                        value_fn=value_fn))
  for _ in range(20):
    updates, state = step(p, state)
    p = optax.apply_updates(p, updates)
  assert float(kernel(p)) < 0.9 * float(kernel(params))


def test_gnb_trains_through_the_kernel_unchanged():
  # Way out (c): the Gauss-Newton-Bartlett estimator needs gradients only.
  params, x, y = _problem()
  kernel, _ = _losses(x, y)
  loss = aho.ggn(lambda p: _logits(p, x, _kernel_attention),
                 aho.SoftmaxCrossEntropy(y))
  tx = aho.adahessian(0.01, estimator=aho.gnb_estimator(0))

  @jax.jit
  def step(params, state):
    value, grads, hessian = aho.value_grad_and_hessian(loss, params, state)
    updates, state = tx.update(grads, state, params, hessian=hessian)
    return optax.apply_updates(params, updates), state, value

  state, p = tx.init(params), params
  values = []
  for _ in range(20):
    p, state, value = step(p, state)
    values.append(float(value))
  np.testing.assert_allclose(values[0], float(kernel(params)), rtol=1e-6)
  assert values[-1] < 0.9 * values[0]


@pytest.mark.slow
def test_pallas_flash_attention_in_interpret_mode():
  attention = pytest.importorskip("jax.experimental.pallas.ops.gpu.attention")
  sizes = attention.BlockSizes(block_q=8, block_k=8, block_q_dkv=8,
                               block_kv_dkv=8, block_q_dq=8, block_kv_dq=8)
  x = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))

  def loss(p, attend):
    q = x * p["w"]
    return jnp.mean(attend(q, q, q) ** 2)

  flash = lambda q, k, v: attention.mha(q, k, v, None, causal=True,
                                        block_sizes=sizes, interpret=True)
  plain = lambda q, k, v: attention.mha_reference(q, k, v, None, causal=True)
  params = {"w": jnp.linspace(0.5, 1.5, 8)}
  with pytest.raises(TypeError, match="custom VJP"):
    aho.hessian_eigenvalues(lambda p: loss(p, flash), params, 0)
  fd = aho.hessian_eigenvalues(
      aho.finite_difference(lambda p: loss(p, flash)), params, 0, k=2)
  exact = aho.hessian_eigenvalues(lambda p: loss(p, plain), params, 0, k=2)
  np.testing.assert_allclose(fd.values, exact.values, rtol=1e-3)
