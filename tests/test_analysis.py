"""Hessian analysis against exact Hessians from jax.hessian, in NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adahessian_optax as aho
from adahessian_optax.algorithms import _common
from adahessian_optax import _probes

N_DEVICES = 4


def _mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return optax.softmax_cross_entropy_with_integer_labels(
      h @ params["w2"], y).mean()


def _cnn_loss(params, batch):
  x, y = batch
  h = jax.lax.conv_general_dilated(
      x, params["conv"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jnp.tanh(h).reshape(x.shape[0], 3, 2, 3, 2, -1).mean(axis=(2, 4))
  return optax.softmax_cross_entropy_with_integer_labels(
      h.reshape(x.shape[0], -1) @ params["dense"], y).mean()


def _problem(name, n=64):
  rng = np.random.default_rng(0)
  if name == "mlp":
    params = {"w1": rng.normal(size=(8, 16)) / np.sqrt(8),
              "b1": 0.1 * rng.normal(size=(16,)),
              "w2": rng.normal(size=(16, 4)) / 2}
    x = rng.normal(size=(n, 8))
  else:
    params = {"conv": rng.normal(size=(3, 3, 1, 4)) / 3,
              "dense": rng.normal(size=(36, 4)) / 3}
    x = rng.normal(size=(n, 6, 6, 1))
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, 4, n)))
  return params, batch, {"mlp": _mlp_loss, "cnn": _cnn_loss}[name]


def _exact_hessian(value_fn, params):
  flat, unravel = ravel_pytree(params)
  hess = jax.jit(jax.hessian(lambda f: value_fn(unravel(f))))(flat)
  return np.asarray(hess, np.float64)


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _rows(stacked, k):
  """A pytree whose leaves have a leading axis k, as k flat rows."""
  return np.stack([_flat(jax.tree.map(lambda x, i=i: x[i], stacked))
                   for i in range(k)])


@functools.lru_cache(maxsize=None)
def _exact_problem(name):
  params, batch, loss_fn = _problem(name)
  hess = _exact_hessian(lambda p: loss_fn(p, batch), params)
  assert np.abs(hess - np.diag(np.diag(hess))).max() > 0.05  # not diagonal
  return params, batch, loss_fn, hess


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def problem(request):
  return _exact_problem(request.param)


def _analyse(value_fn, params):
  """Everything at once, for comparing two ways of giving the same loss."""
  eig = aho.hessian_eigenvalues(value_fn, params, 0, k=2, n_steps=40)
  trace = aho.hessian_trace(value_fn, params, 1, n_samples=4)
  spectrum = aho.hessian_spectrum(value_fn, params, 1, n_samples=2,
                                  n_steps=8)
  return eig, trace, spectrum


@jax.jit
def _analyse_mlp(params, batch):
  return _analyse(lambda p: _mlp_loss(p, batch), params)


@pytest.fixture(scope="module")
def mlp_reference():
  params, batch, _ = _problem("mlp")
  return _analyse_mlp(params, batch)


def _assert_same_analysis(got, want, rtol=1e-4):
  (values, vectors, info), trace, spectrum = got
  (want_values, want_vectors, _), want_trace, want_spectrum = want
  np.testing.assert_allclose(values, want_values, rtol=rtol)
  # Eigenvectors up to sign.
  dots = np.sum(_rows(vectors, 2) * _rows(want_vectors, 2), axis=1)
  np.testing.assert_allclose(np.abs(dots), 1.0, atol=1e-3)
  assert bool(info.converged)
  np.testing.assert_allclose(trace.samples, want_trace.samples, rtol=rtol)
  np.testing.assert_allclose(spectrum.nodes, want_spectrum.nodes, rtol=rtol,
                             atol=1e-5)
  np.testing.assert_allclose(spectrum.weights, want_spectrum.weights,
                             atol=1e-4)


# ---------------------------------------------------------------------------
# Eigenvalues.


def test_top_eigenvalues_and_vectors_match_exact_hessian(problem):
  params, batch, loss_fn, hess = problem
  exact = np.linalg.eigvalsh(hess)[::-1]
  k, tol = 4, 1e-4
  values, vectors, info = jax.jit(lambda p: aho.hessian_eigenvalues(
      lambda q: loss_fn(q, batch), p, 0, k=k, tol=tol))(
          params)
  np.testing.assert_allclose(values, exact[:k], rtol=1e-4)
  assert bool(info.converged)
  dim = hess.shape[0]
  assert int(info.n_steps) < dim // 2  # converged, not exhausted
  y = _rows(vectors, k)
  assert vectors["w2" if "w2" in params else "dense"].shape[0] == k
  np.testing.assert_allclose(y @ y.T, np.eye(k), atol=1e-4)
  true_residuals = np.linalg.norm(y @ hess - exact[:k, None] * y, axis=1)
  # The reported residuals meet the stated tolerance, and they are the
  # true ones (up to float32 rounding of the products).
  assert np.all(np.asarray(info.residuals) <= tol * exact[0])
  np.testing.assert_allclose(info.residuals, true_residuals, atol=2e-6)


# ---------------------------------------------------------------------------
# Trace.


def test_trace_within_its_variance_and_reproducible():
  params, batch, loss_fn, hess = _exact_problem("mlp")
  value_fn = lambda p: loss_fn(p, batch)
  n = 1500
  trace = jax.jit(lambda key: aho.hessian_trace(value_fn, params, key,
                                                n_samples=n))
  got = trace(jax.random.key(3))
  var = 2 * (np.sum(hess ** 2) - np.sum(np.diag(hess) ** 2))
  stderr = np.sqrt(var / n)
  assert abs(float(got.estimate) - np.trace(hess)) < 4 * stderr
  assert 0.9 < float(got.stderr) / stderr < 1.1
  # Per leaf: the trace of each diagonal block, z_l^T (Hz)_l being the
  # quadratic form of the symmetrised (E_l H + H E_l) / 2.
  start = 0
  for name in ("b1", "w1", "w2"):  # ravel_pytree's (sorted) order
    size = params[name].size
    block = slice(start, start + size)
    m = np.zeros_like(hess)
    m[block] = hess[block] / 2
    m[:, block] += hess[:, block] / 2
    leaf_var = 2 * (np.sum(m ** 2) - np.sum(np.diag(m) ** 2))
    leaf_stderr = np.sqrt(leaf_var / n)
    assert abs(float(got.per_leaf[name]) - np.trace(hess[block, block])
               ) < 4 * leaf_stderr
    assert 0.85 < float(got.per_leaf_stderr[name]) / leaf_stderr < 1.15
    start += size
  np.testing.assert_allclose(sum(got.per_leaf.values()), got.estimate,
                             rtol=1e-5)
  np.testing.assert_array_equal(trace(jax.random.key(3)).samples, got.samples)
  assert not np.allclose(trace(jax.random.key(4)).samples, got.samples)


def test_hutch_plus_plus_beats_hutchinson_on_a_decaying_psd_spectrum():
  dim, n = 120, 30
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(dim, dim)))
  a = (q * np.arange(1, dim + 1) ** -2.0) @ q.T
  a32 = jnp.asarray(a, jnp.float32)
  params = {"u": jnp.zeros((4, 5)), "v": jnp.zeros((100,))}
  loss = lambda p: 0.5 * ravel_pytree(p)[0] @ a32 @ ravel_pytree(p)[0]
  keys = jax.random.split(jax.random.key(0), 40)

  def errors(method):
    run = jax.jit(jax.vmap(lambda key: aho.hessian_trace(
        loss, params, key, n_samples=n, method=method)))(keys)
    return np.asarray(run.estimate, np.float64) - np.trace(a), run.stderr

  plain, plain_stderr = errors("hutchinson")
  plus, plus_stderr = errors("hutch++")
  rms = lambda e: np.sqrt(np.mean(e ** 2))
  assert rms(plus) < rms(plain) / 5
  # Unbiased, with standard errors that describe the spread.
  assert abs(np.mean(plus)) < 4 * rms(plus) / np.sqrt(len(keys))
  assert 0.5 < np.mean(plus_stderr) / rms(plus) < 2
  assert 0.5 < np.mean(plain_stderr) / rms(plain) < 2


# ---------------------------------------------------------------------------
# Spectral density.


def test_quadrature_weights_sum_to_one_and_give_hutchinson_samples(
    mlp_reference):
  (_, _, _), trace, spectrum = mlp_reference
  assert spectrum.nodes.shape == spectrum.weights.shape == (2, 8)
  np.testing.assert_allclose(np.sum(spectrum.weights, axis=1), 1.0, atol=1e-5)
  dim = _flat(_problem("mlp")[0]).size
  # The same key: probe s of the spectrum is probe s of the trace.
  np.testing.assert_allclose(
      dim * np.sum(spectrum.weights * spectrum.nodes, axis=1),
      trace.samples[:2], rtol=1e-4)


def test_density_integrates_to_one_and_plots(mlp_reference):
  spectrum = mlp_reference[2]
  sigma = 0.01
  grid = np.linspace(float(spectrum.nodes.min()) - 10 * sigma,
                     float(spectrum.nodes.max()) + 10 * sigma, 20001)
  density = np.asarray(spectrum.density(grid, sigma), np.float64)
  assert density.shape == grid.shape and density.min() >= 0
  np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-4)
  # The formula, in NumPy, at a few points.
  points = np.linspace(grid[0], grid[-1], 7)
  nodes = np.asarray(spectrum.nodes, np.float64).ravel()
  weights = np.asarray(spectrum.weights, np.float64).ravel()
  gauss = np.exp(-0.5 * ((points[:, None] - nodes) / sigma) ** 2) / (
      sigma * np.sqrt(2 * np.pi))
  np.testing.assert_allclose(spectrum.density(points, sigma),
                             gauss @ weights / 2, rtol=1e-4, atol=1e-6)
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  ax = spectrum.plot(sigma=sigma, label="mlp")
  (line,) = ax.get_lines()
  assert line.get_label() == "mlp" and ax.get_yscale() == "log"
  matplotlib.pyplot.close(ax.figure)


def test_quadrature_moments_are_exact_to_degree_2m_minus_1(mlp_reference):
  spectrum = mlp_reference[2]
  params, _, _, hess = _exact_problem("mlp")
  m = spectrum.nodes.shape[1]
  # The first probe of key 1, as the spectrum drew it.
  shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(params))
  _, z = _common.next_probe(_probes.key_data(1, "test"), shapes,
                            "rademacher")
  v = _flat(jax.tree.unflatten(jax.tree.structure(params), z))
  v = v / np.linalg.norm(v)
  nodes = np.asarray(spectrum.nodes[0], np.float64)
  weights = np.asarray(spectrum.weights[0], np.float64)
  top = np.abs(np.linalg.eigvalsh(hess)).max()
  power = v.copy()
  for j in range(2 * m):
    # float32 Lanczos: exact up to rounding of the order of ||H||^j.
    np.testing.assert_allclose(np.sum(weights * nodes ** j), v @ power,
                               rtol=1e-3, atol=1e-5 * top ** j,
                               err_msg=f"degree {j}")
    power = hess @ power


# ---------------------------------------------------------------------------
# A whole dataset.


@pytest.fixture(scope="module")
def mlp_batches():
  _, (x, y), _ = _problem("mlp")
  return [(x[i:i + 20], y[i:i + 20]) for i in range(0, 64, 20)]


def test_ragged_batches_give_the_full_batch_operator(mlp_reference,
                                                     mlp_batches):
  params, _, loss_fn, full = _exact_problem("mlp")
  traces = []

  def counted_loss(p, batch):
    traces.append(batch[0].shape)
    return loss_fn(p, batch)

  batches = mlp_batches
  assert [len(b[1]) for b in batches] == [20, 20, 20, 4]
  data = aho.DatasetLoss(counted_loss, lambda: iter(batches))
  _assert_same_analysis(_analyse(data, params), mlp_reference)
  # One compile per batch shape, however many products.
  assert sorted(traces) == [(4, 8), (20, 8)]
  # Equal weights per batch would be a different operator.
  last = _exact_hessian(lambda p: loss_fn(p, batches[-1]), params)
  others = (full * 64 - last * 4) / 60  # batches 0-2 together
  equal = (3 * others + last) / 4
  top, top_equal = (np.linalg.eigvalsh(h)[-1] for h in (full, equal))
  assert abs(top_equal - top) > 1e-2 * top
  np.testing.assert_allclose(mlp_reference[0][0][0], top, rtol=1e-4)


def test_smallest_eigenvalues_are_the_most_negative(mlp_batches):
  params, _, loss_fn, hess = _exact_problem("mlp")
  exact = np.linalg.eigvalsh(hess)
  assert exact[0] < -0.01 and abs(exact[0]) < exact[-1]
  # Through a DatasetLoss: its compiled steps are those of the test above.
  values, _, _ = aho.hessian_eigenvalues(aho.DatasetLoss(loss_fn, mlp_batches),
                                      params, 0, k=2, which="smallest",
                                      n_steps=40)
  np.testing.assert_allclose(values, exact[:2], rtol=1e-4)


def test_dataset_loss_value_and_bad_batches():
  params, (x, y), loss_fn = _problem("mlp", n=10)
  batches = [(x[:6], y[:6]), (x[6:], y[6:])]
  data = aho.DatasetLoss(loss_fn, batches)
  np.testing.assert_allclose(data(params), loss_fn(params, (x, y)),
                             rtol=1e-6)
  with pytest.raises(TypeError, match="one-shot iterator"):
    aho.DatasetLoss(loss_fn, iter(batches))
  with pytest.raises(TypeError, match="re-iterable"):
    aho.DatasetLoss(loss_fn, 3)
  with pytest.raises(TypeError, match="callable"):
    aho.DatasetLoss(None, batches)
  with pytest.raises(ValueError, match="no examples"):
    aho.hessian_trace(aho.DatasetLoss(loss_fn, []), params, 0, n_samples=2)
  with pytest.raises(TypeError, match="size_fn"):
    aho.DatasetLoss(lambda p, b: loss_fn(p, (x, y)), [3.0])(params)
  with pytest.raises(TypeError, match="jax.jit"):
    jax.jit(lambda p: aho.hessian_trace(data, p, 0, n_samples=2))(params)
  with pytest.raises(ValueError, match="axis_name"):
    aho.hessian_trace(data, params, 0, axis_name="d")


# ---------------------------------------------------------------------------
# Sharding and data parallelism.


def _mesh():
  if jax.device_count() < N_DEVICES:
    pytest.skip(f"needs {N_DEVICES} devices")
  return jax.make_mesh((N_DEVICES,), ("d",), axis_types=(AxisType.Auto,))


@pytest.mark.slow  # every tool on 4 devices, against the unsharded run
def test_sharded_params_and_batch_match_unsharded(mlp_reference):
  mesh = _mesh()
  params, batch, _ = _problem("mlp")
  specs = {"w1": P(None, "d"), "b1": P("d"), "w2": P("d", None)}
  params = jax.device_put(
      params, {k: NamedSharding(mesh, s) for k, s in specs.items()})
  batch = jax.device_put(batch, NamedSharding(mesh, P("d")))
  # Concrete params: one program of our own, the probes placed like the
  # params (the reference ran inside the caller's jit).
  got = _analyse(lambda p: _mlp_loss(p, batch), params)
  _assert_same_analysis(got, mlp_reference)
  vectors = got[0][1]
  assert vectors["w1"].sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, None, "d")), 3)


def test_explicit_mesh_axes_are_refused_by_name():
  if jax.device_count() < N_DEVICES:
    pytest.skip(f"needs {N_DEVICES} devices")
  mesh = jax.make_mesh((N_DEVICES,), ("d",), axis_types=(AxisType.Explicit,))
  w = jax.device_put(jnp.ones((8, 3)), NamedSharding(mesh, P("d")))
  loss = lambda p: jnp.sum(p ** 4)
  with pytest.raises(NotImplementedError, match="explicit mesh axes"):
    aho.hessian_trace(loss, {"w": w}, 0)
  with pytest.raises(NotImplementedError, match="explicit mesh axes"):
    jax.jit(lambda w: aho.hessian_eigenvalues(loss, w, 0).values)(w)


def test_sharded_leaves_stay_sharded_without_gathers():
  # A separable loss needs no communication, so any gather would come from
  # the analysis itself; the basis and eigenvectors keep the leaf's sharding.
  mesh = _mesh()
  sharding = NamedSharding(mesh, P("d"))
  w = jax.device_put(jnp.linspace(-1.0, 1.0, 96 * 40).reshape(96, 40),
                     sharding)
  c = jnp.linspace(1.0, 2.0, 96 * 40).reshape(96, 40)
  c = jax.device_put(c.at[0, 0].set(4.0).at[50, 1].set(3.0), sharding)

  def top(w, c):
    return aho.hessian_eigenvalues(lambda p: jnp.sum(c * p ** 2 + jnp.sin(p)),
                                   w, 0, k=2, n_steps=12)

  compiled = jax.jit(top).lower(w, c).compile()
  hlo = compiled.as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  values, vectors, _ = compiled(w, c)
  assert vectors.sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, "d")), 3)
  # The Hessian is diag(2c - sin w): its two largest entries.
  h = np.sort(np.ravel(2 * np.asarray(c) - np.sin(np.asarray(w))))
  np.testing.assert_allclose(values, h[::-1][:2], rtol=1e-4)


def test_axis_name_averages_the_products_over_replicas(mlp_reference):
  _mesh()
  params, (x, y), loss_fn = _problem("mlp")
  shards = (x.reshape(N_DEVICES, 16, 8), y.reshape(N_DEVICES, 16))
  got = jax.pmap(
      lambda b: aho.hessian_trace(lambda p: loss_fn(p, b), params, 1,
                                  n_samples=4, axis_name="d").samples,
      axis_name="d")(shards)
  for replica in np.asarray(got):
    np.testing.assert_allclose(replica, mlp_reference[1].samples, rtol=1e-5)


# ---------------------------------------------------------------------------
# Dtypes, leaves, models with state, errors.


def test_leaf_dtypes_kept_and_non_float_leaves_skipped():
  a = jnp.array([[3.0, 1.0], [1.0, 2.0]])
  params = {"w": jnp.array([1.0, -1.0], jnp.bfloat16),
            "v": jnp.array([0.5, 2.0], jnp.float32),
            "count": jnp.array(2, jnp.int32), "none": None}

  def loss(p):
    w, v = p["w"].astype(jnp.float32), p["v"]
    scale = p["count"].astype(jnp.float32)
    return scale * (w @ a @ w / 2 + jnp.sum(v ** 2)) + jnp.sum(w * v)

  values, vectors, _ = jax.jit(
      lambda p: aho.hessian_eigenvalues(loss, p, 0, k=2))(params)
  assert vectors["w"].dtype == jnp.bfloat16 and vectors["v"].dtype == jnp.float32
  assert vectors["count"].shape == (2,) and vectors["count"].dtype == jnp.int32
  assert not np.any(np.asarray(vectors["count"])) and vectors["none"] is None
  # H = [[2A, I], [I, 4I]] in (w, v).
  hess = np.block([[2 * np.asarray(a), np.eye(2)], [np.eye(2), 4 * np.eye(2)]])
  # bfloat16 products carry 8 bits.
  np.testing.assert_allclose(values, np.linalg.eigvalsh(hess)[::-1][:2],
                             rtol=2e-2)
  trace = jax.jit(lambda p: aho.hessian_trace(
      loss, p, 0, n_samples=400, distribution="gaussian"))(params)
  # Gaussian probes: Var z_l^T (Hz)_l = 2 ||M_l||_F^2, M_l the symmetrised
  # rows of leaf l.
  for name, rows in (("w", slice(0, 2)), ("v", slice(2, 4))):
    m = np.zeros_like(hess)
    m[rows] = hess[rows] / 2
    m[:, rows] += hess[:, rows] / 2
    stderr = np.sqrt(2 * np.sum(m ** 2) / 400)
    assert abs(float(trace.per_leaf[name]) - np.trace(hess[rows, rows])
               ) < 4 * stderr
    assert 0.8 < float(trace.per_leaf_stderr[name]) / stderr < 1.2
  assert float(trace.per_leaf["count"]) == 0.0 and trace.per_leaf["none"] is None


def test_sub_batch_closure_analyses_its_head():
  x = jnp.array([1.0, 2.0, 3.0, 4.0])
  value_fn = aho.sub_batch_value_fn(lambda w, xb: jnp.mean(xb * w ** 2), x,
                                    fraction=0.5)
  # The products are the first two examples': H = 2 mean(x[:2]) = 3, not 5.
  trace = aho.hessian_trace(value_fn, jnp.ones(()), 0, n_samples=2)
  np.testing.assert_allclose(trace.estimate, 3.0, rtol=1e-6)


@pytest.mark.slow  # compiles an NNX model with BatchNorm and Dropout
def test_nnx_model_with_batchnorm_and_dropout():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.lin1 = nnx.Linear(4, 8, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.lin2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 4))
  y = jnp.arange(16) % 3
  params = nnx.as_pure(nnx.state(model, nnx.Param))

  model.eval()  # running statistics, no dropout: a function of the params
  eval_fn = aho.nnx_value_fn(loss_fn, model, x, y)
  values, _, _ = jax.jit(lambda p: aho.hessian_eigenvalues(eval_fn, p, 0))(params)
  eval_hessian = _exact_hessian(eval_fn, params)
  np.testing.assert_allclose(values, np.linalg.eigvalsh(eval_hessian)[-1:],
                             rtol=1e-4)
  # Training mode: batch statistics, and the one dropout mask the closure
  # fixed when it was built, so the same function on every call.
  model.train()
  train_fn = aho.nnx_value_fn(loss_fn, model, x, y)
  trace = jax.jit(lambda p: aho.hessian_trace(train_fn, p, 0, n_samples=200))
  first = trace(params)
  np.testing.assert_array_equal(trace(params).samples, first.samples)
  exact = np.trace(_exact_hessian(train_fn, params))
  assert abs(float(first.estimate) - exact) < 4 * float(first.stderr)


def test_bad_inputs_are_named():
  params = {"w": jnp.ones(3)}
  loss = lambda p: jnp.sum(p["w"] ** 4)
  with pytest.raises(ValueError, match=r"k must lie in \[1, 3\]"):
    aho.hessian_eigenvalues(loss, params, 0, k=4)
  with pytest.raises(ValueError, match="k must be an integer >= 1"):
    aho.hessian_eigenvalues(loss, params, 0, k=0)
  with pytest.raises(ValueError, match=r"n_steps must lie in \[2, 3\]"):
    aho.hessian_eigenvalues(loss, params, 0, k=2, n_steps=1)
  with pytest.raises(ValueError, match=r"n_steps must lie in \[1, 3\]"):
    aho.hessian_spectrum(loss, params, 0, n_steps=4)
  with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
    aho.hessian_spectrum(loss, params, 0, n_steps=0)
  with pytest.raises(ValueError, match="which"):
    aho.hessian_eigenvalues(loss, params, 0, which="magnitude")
  with pytest.raises(ValueError, match="tol"):
    aho.hessian_eigenvalues(loss, params, 0, tol=0.0)
  with pytest.raises(ValueError, match="method"):
    aho.hessian_trace(loss, params, 0, method="xtrace")
  with pytest.raises(ValueError, match="n_samples >= 3"):
    aho.hessian_trace(loss, params, 0, n_samples=2, method="hutch++")
  with pytest.raises(ValueError, match="distribution"):
    aho.hessian_trace(loss, params, 0, distribution="uniform")
  with pytest.raises(ValueError, match="scalar"):
    aho.hessian_trace(lambda p: p["w"], params, 0)
  with pytest.raises(TypeError, match="floating"):
    aho.hessian_trace(lambda p: jnp.sum(p["w"]).astype(jnp.int32), params, 0)
  with pytest.raises(ValueError, match="no floating-point leaf"):
    aho.hessian_spectrum(loss, {"n": jnp.arange(3)}, 0)
  with pytest.raises(ValueError, match="params"):
    aho.hessian_trace(loss, None, 0)
  with pytest.raises(TypeError, match="callable"):
    aho.hessian_eigenvalues(3.0, params, 0)
  with pytest.raises(ValueError, match="key"):
    aho.hessian_trace(loss, params, None)
  spectrum = aho.SpectralDensity(jnp.zeros((1, 2)), jnp.full((1, 2), 0.5))
  with pytest.raises(ValueError, match="sigma"):
    spectrum.density(jnp.zeros(3), 0.0)


@pytest.mark.parametrize("jit", [False, True])
def test_repeated_eigenvalue_hidden_by_an_invariant_subspace(jit):
  # From one start vector the Krylov space of diag(2, 2, 2, 6, 6) has
  # dimension 2 and its Ritz values {6, 2} are exact with zero residuals; the
  # second copy of 6 lies in the complement, so the run must not stop there.
  d = jnp.array([2.0, 2.0, 2.0, 6.0, 6.0])
  loss = lambda w: 0.5 * jnp.sum(d * w ** 2)
  fn = lambda w: aho.hessian_eigenvalues(loss, w, 0, k=2)
  values, _, info = (jax.jit(fn) if jit else fn)(jnp.ones(5))
  np.testing.assert_allclose(values, [6.0, 6.0], rtol=1e-4)
  assert bool(info.converged) and int(info.n_steps) > 2


def test_programs_are_compiled_per_loss_object_as_jit_does():
  # Outside jit the programs are cached by the operator's definition (the
  # loss object, the settings, the shapes), not by tracing the closure on
  # every call: like jax.jit, a closure's Python reads are fixed at its
  # first compile, a new closure object is traced afresh, and a Python leaf
  # of the params is part of the definition.
  box = {"scale": 1.0}
  params = {"w": jnp.ones(3), "repeats": 2}

  def loss(p):
    return sum(box["scale"] * jnp.sum(p["w"] ** 2) for _ in range(p["repeats"]))

  # H = 2 * repeats * scale * I on w: trace 3 * that, exactly for Rademacher.
  assert float(aho.hessian_trace(loss, params, 0, n_samples=2).estimate) == 12.0
  box["scale"] = 10.0
  assert float(aho.hessian_trace(loss, params, 0, n_samples=2).estimate) == 12.0
  fresh = lambda p: loss(p)
  assert float(aho.hessian_trace(fresh, params, 0, n_samples=2).estimate) == 120.0
  params["repeats"] = 1
  top, _, _ = aho.hessian_eigenvalues(fresh, params, 0)
  np.testing.assert_allclose(top, [20.0], rtol=1e-5)
  # NumPy params are concrete params.
  top, _, _ = aho.hessian_eigenvalues(fresh, {"w": np.ones(3), "repeats": 1}, 0)
  np.testing.assert_allclose(top, [20.0], rtol=1e-5)


def test_non_finite_products_raise_outside_jit_and_stop_under_it():
  loss = lambda w: jnp.sum(jnp.log(w) * w ** 2)  # NaN for w < 0
  w = -jnp.ones(4)
  for fn in (lambda: aho.hessian_trace(loss, w, 0, n_samples=4),
             lambda: aho.hessian_eigenvalues(loss, w, 0),
             lambda: aho.hessian_spectrum(loss, w, 0, n_steps=3)):
    with pytest.raises(ValueError, match="not finite"):
      fn()
  values, _, info = jax.jit(lambda w: aho.hessian_eigenvalues(
      loss, w, 0))(w)
  assert np.isnan(values).all() and not bool(info.converged)
  assert int(info.n_steps) == 1  # stopped at the first NaN product
  with pytest.raises(ValueError, match=r"pass value_fn=<params -> scalar loss>\.$"):
    aho.hessian_trace(None, w, 0)


@pytest.mark.parametrize("jit", [False, True])
def test_one_dimensional_params(jit):
  # A single float entry: one Lanczos step, no off-diagonal at all.
  fn = lambda w: aho.hessian_eigenvalues(lambda v: 1.5 * v ** 2, w, 0)
  values, vectors, info = (jax.jit(fn) if jit else fn)(jnp.ones(()))
  np.testing.assert_allclose(values, [3.0], rtol=1e-6)
  assert abs(float(vectors[0])) == 1.0 and bool(info.converged)


# ---------------------------------------------------------------------------
# Blocks (wrt=), preconditioners, warm starts, the per-layer summary.


def _block(hess, params, keep):
  """The rows and columns of `hess` (flat, like params) that `keep` marks."""
  mask = _flat(jax.tree.map(lambda x, m: np.broadcast_to(m, x.shape) * 1.0,
                            params, keep)) > 0
  return hess[np.ix_(mask, mask)]


def test_wrt_restricts_to_the_exact_block():
  params, batch, loss_fn, hess = _exact_problem("mlp")
  value_fn = lambda p: loss_fn(p, batch)
  # One leaf, and part of another (two of the hidden units' input weights).
  cols = np.zeros((1, 16), bool)
  cols[0, [3, 7]] = True
  keep = {"w1": cols, "b1": False, "w2": True}
  block = _block(hess, params, keep)
  exact = np.linalg.eigvalsh(block)
  got = aho.hessian_eigenvalues(value_fn, params, 0, k=2, wrt=keep)
  np.testing.assert_allclose(got.values, exact[::-1][:2], rtol=1e-4)
  assert not np.any(np.asarray(got.vectors["b1"]))
  assert not np.any(np.asarray(got.vectors["w1"])[:, :, ~cols[0]])
  trace = aho.hessian_trace(value_fn, params, 0, n_samples=200,
                            wrt=lambda p: keep)
  assert abs(float(trace.estimate) - np.trace(block)) < 5 * float(
      trace.stderr)
  assert float(trace.per_leaf["b1"]) == 0.0
  with pytest.raises(ValueError, match=r"n_steps must lie in \[1, 64\]"):
    aho.hessian_spectrum(value_fn, params, 0, n_steps=65,
                         wrt={"w1": False, "b1": False, "w2": True})


def test_wrt_picks_one_layer_of_a_stacked_leaf():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(3, 4, 4))
  a = jnp.asarray(a + a.transpose(0, 2, 1), jnp.float32)  # three layers
  loss = lambda w: 0.5 * jnp.einsum("lij,li,lj->", a, w, w) + jnp.sum(
      w[0] * w[1] * w[2])
  w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  hess = np.asarray(jax.hessian(lambda f: loss(f.reshape(3, 4)))(
      w.reshape(-1)), np.float64)
  layer = np.arange(3)[:, None] == 1
  got = jax.jit(lambda w: aho.hessian_eigenvalues(
      loss, w, 0, k=4, wrt=layer).values)(w)
  np.testing.assert_allclose(
      got, np.linalg.eigvalsh(hess[4:8, 4:8])[::-1], rtol=1e-4, atol=1e-5)


def test_wrt_errors_are_named():
  params = {"w": jnp.ones(3), "n": jnp.arange(2)}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  with pytest.raises(ValueError, match="selects no floating-point entry"):
    aho.hessian_trace(loss, params, 0, wrt={"w": False, "n": True})
  with pytest.raises(ValueError, match="does not broadcast"):
    aho.hessian_trace(loss, params, 0, wrt={"w": np.ones(2, bool), "n": 0 > 1})
  with pytest.raises(TypeError, match="bools or boolean arrays"):
    aho.hessian_trace(loss, params, 0, wrt={"w": 1, "n": False})
  with pytest.raises(ValueError, match="pytree prefix of params"):
    aho.hessian_trace(loss, params, 0, wrt={"v": True})


def test_preconditioned_eigenvalues_match_exact():
  params, batch, loss_fn, hess = _exact_problem("mlp")
  rng = np.random.default_rng(4)
  precond = jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.1, 3.0, x.shape), jnp.float32),
      params)
  s = 1 / np.sqrt(_flat(precond))
  exact = np.linalg.eigvalsh(s[:, None] * hess * s[None, :])
  top = aho.hessian_eigenvalues(lambda q: loss_fn(q, batch), params, 0, k=2,
                                preconditioner=precond).values
  low = jax.jit(lambda p: aho.hessian_eigenvalues(
      lambda q: loss_fn(q, batch), p, 0, which="smallest",
      preconditioner=precond).values)(params)
  np.testing.assert_allclose(top, exact[::-1][:2], rtol=1e-4)
  np.testing.assert_allclose(low, exact[:1], rtol=1e-3, atol=1e-5)
  with pytest.raises(ValueError, match="must be positive"):
    aho.hessian_eigenvalues(lambda q: loss_fn(q, batch), params, 0,
                            preconditioner=jax.tree.map(jnp.zeros_like,
                                                        params))


def test_warm_start_converges_in_fewer_products():
  params, batch, loss_fn, hess = _exact_problem("mlp")
  exact = np.linalg.eigvalsh(hess)[-1]
  value_fn = lambda p: loss_fn(p, batch)
  cold = aho.hessian_eigenvalues(value_fn, params, 0)
  # A nearby point, as after a training step: its own cold start against a
  # start from the previous point's eigenvector.
  moved = jax.tree.map(lambda x: x * 1.01, params)
  moved_exact = np.linalg.eigvalsh(_exact_hessian(value_fn, moved))[-1]
  cold2 = aho.hessian_eigenvalues(value_fn, moved, 1)
  warm = aho.hessian_eigenvalues(value_fn, moved, 1, init=cold.vectors)
  np.testing.assert_allclose(cold.values[0], exact, rtol=1e-4)
  np.testing.assert_allclose(warm.values[0], moved_exact, rtol=1e-4)
  np.testing.assert_allclose(cold2.values[0], moved_exact, rtol=1e-4)
  assert bool(warm.info.converged) and bool(cold2.info.converged)
  # Measured: 7 products against 14.
  assert int(warm.info.n_steps) <= 0.6 * int(cold2.info.n_steps)


def test_names_removed_in_0_6_are_refused():
  # The 0.3 names, deprecated since 0.4, are gone (CHANGELOG 0.6.0).
  loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * w ** 2)
  w = jnp.ones(4)
  for kwargs in ({"max_steps": 4}, {"return_info": True}):
    with pytest.raises(TypeError, match="unexpected keyword"):
      aho.hessian_eigenvalues(loss, w, 0, **kwargs)
  for kwargs in ({"num_probes": 2}, {"num_steps": 4}):
    with pytest.raises(TypeError, match="unexpected keyword"):
      aho.hessian_spectrum(loss, w, 0, **kwargs)
  assert not hasattr(aho, "PerformanceWarning")


def test_layer_summary_matches_exact_blocks():
  params, batch, loss_fn, hess = _exact_problem("mlp")
  summary = aho.layer_summary(lambda p: loss_fn(p, batch), params, 0,
                              n_samples=200, n_steps=64)
  for name in params:
    keep = {k: k == name for k in params}
    block = _block(hess, params, keep)
    n = block.shape[0]
    assert int(summary.size[name]) == n
    np.testing.assert_allclose(summary.top_eigenvalue[name],
                               np.linalg.eigvalsh(block)[-1], rtol=1e-3)
    err = abs(float(summary.mean_trace[name]) - np.trace(block) / n)
    assert err < 5 * float(summary.mean_trace_stderr[name]) + 1e-7


def test_sharpness_tracked_inside_a_jitted_training_step():
  params, batch, loss_fn, _ = _exact_problem("mlp")
  value_fn = lambda p: loss_fn(p, batch)

  @jax.jit
  def step(params, vectors):
    top = aho.hessian_eigenvalues(value_fn, params, 0, init=vectors)
    grads = jax.grad(value_fn)(params)
    params = jax.tree.map(lambda p, g: p - 0.2 * g, params, grads)
    return params, top

  vectors = jax.tree.map(lambda x: jnp.ones((1,) + x.shape), params)
  for _ in range(3):
    exact = np.linalg.eigvalsh(_exact_hessian(value_fn, params))[-1]
    cold = aho.hessian_eigenvalues(value_fn, params, 0)
    params, top = step(params, vectors)
    np.testing.assert_allclose(top.values[0], exact, rtol=1e-4)
    vectors = top.vectors
  # The last step's warm start against a cold start at the same point.
  assert int(top.info.n_steps) < int(cold.info.n_steps)


@pytest.mark.parametrize("warm", [False, True])
def test_top_eigenvalue_not_taken_from_inside_the_spectrum(warm):
  # The negative end dominates the norm: a Ritz value near zero once passed
  # a test relative to the largest |theta| after two products.
  lam = np.random.default_rng(0).uniform(-0.1, 0.1, 1000)
  lam[:10] = np.linspace(-2000, -1500, 10)
  lam[10] = 100.0
  lam = jnp.asarray(lam, jnp.float32)
  init = jnp.zeros((1, 1000)).at[0, 500].set(1.0) if warm else None
  got = aho.hessian_eigenvalues(lambda p: 0.5 * jnp.sum(lam * p ** 2),
                                jnp.zeros(1000), 0, tol=1e-2, init=init)
  np.testing.assert_allclose(got.values, [100.0], rtol=1e-2)
