"""The Gauss-Newton-Bartlett estimator against exact GGNs from jax.jacobian
and jax.hessian, against a NumPy Sophia-G, and in AdaHessian's steps."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, PartitionSpec as P

import adahessian_optax as aho
from adahessian_optax.estimators import _gnb
from adahessian_optax import _probes

B, D_IN, H, C = 6, 3, 4, 3  # examples, inputs, hidden units, classes


@pytest.fixture(autouse=True)
def _float32_matmuls():
  # GPUs multiply float32 matrices in TF32 (about 3 digits) by default; the
  # comparisons here are of the estimator's mathematics, at float32.
  with jax.default_matmul_precision("highest"):
    yield


def _data(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "w1": jnp.asarray(rng.normal(size=(D_IN, H)), jnp.float32),
      "b1": jnp.asarray(rng.normal(size=(H,)) * 0.3, jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(H, C)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, C, B), jnp.int32)
  targets = jnp.asarray(rng.normal(size=(B, C)), jnp.float32)
  return params, x, labels, targets


def _mlp(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _output_loss(kind, labels, targets):
  return (aho.SoftmaxCrossEntropy(labels) if kind == "softmax"
          else aho.SquaredError(targets))


def _exact_ggn(loss, params):
  """J^T (d^2 l / d f^2) J from jax.jacobian and jax.hessian, float64, and
  the Hessian of the loss from jax.hessian."""
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def parts(flat):
    outputs = loss.output_fn(unravel(flat))
    jac = jax.jacobian(lambda f: loss.output_fn(unravel(f)).reshape(-1))(flat)
    hess_l = jax.hessian(lambda o: loss.output_loss(o.reshape(
        outputs.shape)))(outputs.reshape(-1))
    return jac, hess_l, jax.hessian(lambda f: loss(unravel(f)))(flat)

  jac, hess_l, hess = (np.asarray(a, np.float64) for a in parts(flat))
  return jac.T @ hess_l @ jac, hess


def _draws(loss, params, n, seed, **kw):
  keys = jax.random.split(jax.random.key(seed), n)
  one = lambda k: ravel_pytree(aho.gnb_diagonal(loss, params, k, **kw)
                               .diagonal)[0]
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def _assert_mean_within(draws, want):
  """Per coordinate, |mean - want| <= 5 standard errors of the mean + 1e-6.

  A coordinate's chance of a 5-sigma miss is about 6e-7 for a normal mean;
  with a few dozen coordinates (and fixed keys) the test is not flaky.
  """
  mean = draws.mean(axis=0)
  stderr = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
  np.testing.assert_array_less(np.abs(mean - want), 5 * stderr + 1e-6)


@pytest.mark.parametrize("kind", [
    "softmax", pytest.param("squared", marks=pytest.mark.slow)])
def test_mean_over_draws_is_the_exact_ggn_diagonal(kind):
  params, x, labels, targets = _data()
  loss = aho.ggn(lambda p: _mlp(p, x), _output_loss(kind, labels, targets))
  ggn, hess = _exact_ggn(loss, params)
  # The network is not linear: the GGN is not the Hessian here, so matching
  # the GGN's diagonal (not the Hessian's) is informative.
  assert np.abs(np.diag(hess) - np.diag(ggn)).max() > 0.02
  draws = _draws(loss, params, 3000, seed=1)
  assert draws.min() >= 0  # never negative
  _assert_mean_within(draws, np.diag(ggn))


def test_linear_model_mean_is_the_hessian_diagonal():
  # f = x W is linear in W, so the GGN is the Hessian (softmax
  # cross-entropy, whose Hessian has off-diagonal entries).
  params, x, labels, _ = _data(seed=2)
  w = params["w2"][:D_IN]
  loss = aho.ggn(lambda w: x @ w, aho.SoftmaxCrossEntropy(labels))
  ggn, hess = _exact_ggn(loss, w)
  assert np.abs(hess - np.diag(np.diag(hess))).max() > 0.05
  np.testing.assert_allclose(ggn, hess, atol=1e-6)
  _assert_mean_within(_draws(loss, w, 2000, seed=3), np.diag(hess))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sampled_gradient(output_fn, output_loss, params, key, head):
  """N g * g for labels drawn with `key` for the first `head` examples,
  g from jax.grad of the whole closure (not the estimator's vjp)."""
  outputs = output_fn(params)
  sampled = _gnb.draw(output_loss, key, outputs[:head])
  g = jax.grad(lambda p: sampled(output_fn(p)[:head]))(params)
  n = output_loss.num_positions(outputs[:head])
  return jax.tree.map(lambda a: n * a ** 2, g)


@pytest.mark.parametrize("fraction, head", [
    pytest.param(1.0, B, marks=pytest.mark.slow), (0.5, 3)])
def test_draws_averaged_on_the_sub_batch(fraction, head):
  params, x, labels, _ = _data()
  output_fn = lambda p: _mlp(p, x)
  loss = aho.ggn(output_fn, aho.SoftmaxCrossEntropy(labels))
  state = aho.gnb_estimator(4, n_samples=2, fraction=fraction).init(None)
  result = jax.jit(lambda p: aho.gnb_diagonal(
      loss, p, 4, n_samples=2, fraction=fraction))(params)

  @jax.jit
  def reference(params):
    # The same labels (the key's draw half, one key per sample), each
    # draw's gradient from jax.grad, averaged; the true value and gradient.
    _, draw_key = _probes.split(state.key)
    terms = [_sampled_gradient(output_fn, loss.output_loss, params, k, head)
             for k in _gnb.sample_keys(state.estimator, draw_key)]
    return (jax.tree.map(lambda *t: sum(t) / len(t), *terms),
            *jax.value_and_grad(loss)(params))

  want, value, grad = reference(params)
  for k in params:
    np.testing.assert_allclose(result.diagonal[k], want[k], rtol=1e-5,
                               atol=1e-7)
  np.testing.assert_allclose(result.value, value, rtol=1e-6)
  for k in params:
    np.testing.assert_allclose(result.grad[k], grad[k], rtol=1e-5, atol=1e-7)


def test_keyed_never_negative_and_non_float_leaves():
  params, x, _, targets = _data()
  params = dict(params, step=jnp.array(3, jnp.int32), empty=None)
  loss = aho.ggn(lambda p: _mlp(p, x), aho.SquaredError(targets))
  estimate = jax.jit(lambda p, k: aho.gnb_diagonal(loss, p, k))
  a, b, c = (estimate(params, k) for k in (7, 7, 8))
  for k in ("w1", "b1", "w2"):
    np.testing.assert_array_equal(a.diagonal[k], b.diagonal[k])
    assert not np.allclose(a.diagonal[k], c.diagonal[k])
    assert np.all(np.asarray(a.diagonal[k]) >= 0)
  assert a.diagonal["step"].dtype == jnp.int32 and int(a.diagonal["step"]) == 0
  assert a.diagonal["empty"] is None


@pytest.mark.standard_promotion  # optax.contrib.sophia
def test_sophia_with_gnb_matches_numpy_sophia_g():
  params, x, labels, _ = _data(seed=5)
  params = {"w": params["w2"][:D_IN], "b": jnp.zeros(C)}
  output_fn = lambda p: x @ p["w"] + p["b"]
  loss = aho.ggn(output_fn, aho.SoftmaxCrossEntropy(labels))
  lr, b1, b2, eps, wd, gamma, rho, k = 0.1, 0.9, 0.5, 1e-8, 1e-2, 20.0, 1.0, 2
  tx = optax.contrib.sophia(
      lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, gamma=gamma,
      clip_threshold=rho, update_interval=k,
      hessian_diagonal_fn=aho.gnb_estimator(key=3))
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, obj_fn=loss))
  state, p = tx.init(params), params
  # NumPy Sophia-G (as optax.contrib.sophia: m bias-corrected, h not; the
  # update uses h before this step's refresh), the estimate N g_hat^2 from
  # labels redrawn with the estimator's key derivation.
  key = aho.gnb_estimator(3).init(None).key
  ref = {n: np.asarray(v, np.float64) for n, v in params.items()}
  m = {n: np.zeros_like(v) for n, v in ref.items()}
  h = {n: np.zeros_like(v) for n, v in ref.items()}
  grad = jax.jit(jax.grad(loss))
  clipped = unclipped = 0
  for t in range(6):
    at = {n: jnp.asarray(v, jnp.float32) for n, v in ref.items()}
    g = {n: np.asarray(v, np.float64) for n, v in grad(at).items()}
    for n in ref:
      m[n] = b1 * m[n] + (1 - b1) * g[n]
    u = {n: np.clip(m[n] / (1 - b1 ** (t + 1)) / np.maximum(gamma * h[n], eps),
                    -rho, rho) for n in ref}
    if t % k == 0:
      key, draw_key = _probes.split(key)
      [sample_key] = _gnb.sample_keys(aho.gnb_estimator(3).init(None).estimator,
                                      draw_key)
      est = _sampled_gradient(output_fn, loss.output_loss, at, sample_key, B)
      h = {n: b2 * h[n] + (1 - b2) * np.asarray(est[n], np.float64)
           for n in ref}
    clipped += sum(int(np.sum(np.abs(u[n]) >= rho)) for n in u)
    unclipped += sum(int(np.sum(np.abs(u[n]) < rho)) for n in u)
    ref = {n: ref[n] - lr * (u[n] + wd * ref[n]) for n in ref}

    updates, state = step(p, state)
    p = optax.apply_updates(p, updates)
    for n in ref:
      np.testing.assert_allclose(p[n], ref[n], rtol=1e-5, atol=1e-6)
  # Both regimes of the update: sign steps (clipped) and curvature-scaled.
  assert clipped > 0 and unclipped > 0


def test_adahessian_fused_step_equals_plain_step():
  params, x, labels, _ = _data()
  loss = aho.ggn(lambda p: _mlp(p, x), aho.SoftmaxCrossEntropy(labels))
  tx = aho.adahessian(0.05, b2=0.5, estimator=aho.gnb_estimator(key=0))

  @jax.jit
  def fused(p, s):
    value, grads, hessian = aho.value_grad_and_hessian(loss, p, s)
    updates, s = tx.update(grads, s, p, hessian=hessian)
    return optax.apply_updates(p, updates), s, (value, grads, hessian)

  @jax.jit
  def plain(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = tx.update(grads, s, p, value_fn=loss)
    return optax.apply_updates(p, updates), s, value

  runs = []
  for step in (fused, plain):
    p, s = params, tx.init(params)
    for _ in range(3):
      p, s, out = step(p, s)
      runs.append((p, s, out))
  fused_runs, plain_runs = runs[:3], runs[3:]
  for (pf, sf, _), (pp, sp, _) in zip(fused_runs, plain_runs):
    np.testing.assert_array_equal(sf[0].estimator.key, sp[0].estimator.key)
    for k in params:
      np.testing.assert_allclose(pf[k], pp[k], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(sf[0].nu[k], sp[0].nu[k], rtol=1e-5,
                                 atol=1e-12)
  # The fused pass's value and gradient are the loss's; its first estimate
  # is gnb_diagonal's with the same key, and enters AdaHessian's EMA (no
  # spatial rule on a bare pytree).
  (_, s1, (value, grads, hessian)), (_, _, plain_value) = runs[0], runs[3]
  np.testing.assert_allclose(value, plain_value, rtol=1e-6)
  want = jax.jit(lambda p: aho.gnb_diagonal(loss, p, 0))(params)
  for k in params:
    np.testing.assert_allclose(grads[k], want.grad[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hessian.diagonal[k], want.diagonal[k],
                               rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(s1[0].nu[k], 0.5 * np.asarray(
        hessian.diagonal[k]) ** 2, rtol=1e-5, atol=1e-12)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
@pytest.mark.parametrize("mapper", [
    "pmap", pytest.param("shard_map", marks=pytest.mark.slow)])
def test_axis_name_gives_the_whole_batch_estimate(mapper):
  n_dev = 2
  params, x, labels, _ = _data()
  key = 9

  def local(x, labels):
    loss = aho.ggn(lambda p: _mlp(p, x), aho.SoftmaxCrossEntropy(labels))
    result = aho.gnb_diagonal(loss, params, key, axis_name="i")
    # The labels this device drew, for the reference below.
    state = aho.gnb_estimator(key, axis_name="i").init(None)
    [k] = _gnb.sample_keys(state.estimator, _probes.split(state.key)[1])
    drawn = _gnb.draw(loss.output_loss, k, _mlp(params, x)).labels
    return result, drawn

  xs, ys = x.reshape(n_dev, -1, D_IN), labels.reshape(n_dev, -1)
  if mapper == "pmap":
    result, drawn = jax.pmap(local, axis_name="i")(xs, ys)
  else:
    mesh = jax.make_mesh((n_dev,), ("i",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n_dev])
    result, drawn = jax.jit(jax.shard_map(
        lambda x, y: jax.tree.map(lambda a: a[None], local(x[0], y[0])),
        mesh=mesh, in_specs=P("i"), out_specs=P("i")))(xs, ys)
  result = jax.tree.map(np.asarray, result)
  for leaf in jax.tree.leaves(result):
    np.testing.assert_array_equal(leaf[1], leaf[0])  # replicas agree
  drawn = np.asarray(drawn)
  assert not np.array_equal(drawn[0], drawn[1])  # devices draw their own

  # One device, the whole batch, the labels the devices drew.
  whole = aho.ggn(lambda p: _mlp(p, x), aho.SoftmaxCrossEntropy(labels))
  g, (value, grad) = jax.jit(lambda p, drawn: (
      jax.grad(lambda q: aho.SoftmaxCrossEntropy(drawn)(_mlp(q, x)))(p),
      jax.value_and_grad(whole)(p)))(params, jnp.asarray(drawn.reshape(-1)))
  np.testing.assert_allclose(result.value[0], value, rtol=1e-6)
  for k in params:
    np.testing.assert_allclose(result.diagonal[k][0],
                               B * np.asarray(g[k]) ** 2, rtol=1e-5,
                               atol=1e-8)
    np.testing.assert_allclose(result.grad[k][0], grad[k], rtol=1e-5,
                               atol=1e-7)


def test_state_is_found_serialised_and_configured_once():
  params = jnp.ones(2)
  est = aho.gnb_estimator(5, n_samples=2, fraction=0.5, axis_name="d")
  state = aho.adahessian(0.1, estimator=est).init(params)
  inner = state[0].estimator
  assert isinstance(inner, aho.EstimatorState)
  config = inner.estimator
  assert (config.n_samples, config.fraction, config.axis_name) == (2, 0.5, "d")
  assert serialization.to_state_dict(inner).keys() == {"key"}
  restored = serialization.from_bytes(state, serialization.to_bytes(state))
  np.testing.assert_array_equal(restored[0].estimator.key, inner.key)
  with pytest.raises(ValueError, match="holds 2 EstimatorState"):
    aho.value_grad_and_hessian(jnp.sum, params, (state, state))


def test_large_cotangents_are_pulled_back_one_call_each():
  # A language model's logits over a large vocabulary: stacking the true
  # and the sampled cotangents for one batched vjp copies them and doubles
  # the backward's temporaries, so beyond 64 MiB each they go one vjp call
  # each; below it, rank 3 and more stay batched. Both give the same sums.
  w = jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32)
  f = lambda w, x: jnp.tanh(x * w)

  def pulled(batched, shape, batch_bytes=1 << 26):
    def run(x, c1, c2):
      _, vjp = jax.vjp(lambda leaves: f(leaves[0], x), [w])
      return _gnb._pull_back(vjp, [c1, c2], batched, batch_bytes)  # pylint: disable=protected-access
    return run, [jax.ShapeDtypeStruct(shape, jnp.float32)] * 3

  def stacks(*args):
    run, shapes = pulled(*args)
    return " stack[" in str(jax.make_jaxpr(run)(*shapes))

  small, large = (2, 4, 8), (1024, 8192, 8)  # 256 bytes, 256 MiB
  assert stacks(None, small)
  assert not stacks(None, large)
  assert not stacks(None, (4, 8))           # rank 2: one call each
  assert stacks(True, large)                # an explicit choice holds
  keys = jax.random.split(jax.random.key(0), 3)
  x, c1, c2 = (jax.random.normal(k, small) for k in keys)
  run_b, _ = pulled(None, small)
  run_s, _ = pulled(None, small, 0)         # everything "large"
  for a, b in zip(run_b(x, c1, c2), run_s(x, c1, c2)):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


def test_errors_name_the_problem():
  params, x, labels, _ = _data()
  loss = aho.ggn(lambda p: _mlp(p, x), aho.SoftmaxCrossEntropy(labels))
  plain = lambda p: loss(p)
  with pytest.raises(TypeError, match=r"value_fn=aho.ggn\(output_fn"):
    aho.gnb_diagonal(plain, params, 0)
  with pytest.raises(TypeError, match="cannot draw labels from the output "
                     "loss function"):
    aho.gnb_diagonal(aho.ggn(loss.output_fn, lambda o: jnp.mean(o ** 2)),
                     params, 0)
  with pytest.raises(ValueError, match="needs `key`"):
    aho.gnb_estimator()
  with pytest.raises(ValueError, match="fraction"):
    aho.gnb_estimator(0, fraction=1.5)
  with pytest.raises(ValueError, match="no example axis"):
    aho.gnb_diagonal(aho.ggn(lambda p: p["w2"][0], aho.SoftmaxCrossEntropy(
        jnp.array(0))), params, 0, fraction=0.5)
  tx = aho.adahessian(0.1, estimator=aho.gnb_estimator(0))
  state = tx.init(params)
  with pytest.raises(TypeError, match=r"value_fn=aho.ggn\(output_fn"):
    tx.update(params, state, params, value_fn=plain)
  with pytest.raises(TypeError, match=r"value_fn=aho.ggn\(output_fn"):
    aho.value_grad_and_hessian(plain, params, state)
  est = aho.gnb_estimator(0)
  with pytest.raises(ValueError, match="obj_fn"):
    est.update(None, est.init(params), params)


@pytest.mark.slow  # a process of its own, compiling the example's programs
def test_char_lm_example_trains_with_gnb(run_script, tmp_path):
  run_script("examples/char_lm.py", "--smoke", "--no-progress", "--out",
             str(tmp_path), "--optimizers", "AdaHessian-GNB", "Sophia-G",
             "AdamW")
  results = json.loads((tmp_path / "char_lm_results.json").read_text())
  assert [r["name"] for r in results] == ["AdaHessian-GNB", "Sophia-G",
                                          "AdamW"]
  for r in results:
    assert r["finite"] and 0.0 < r["final_val_loss"] < 10.0
