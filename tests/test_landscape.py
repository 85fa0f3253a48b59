"""loss_landscape and filter_normalized_direction against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adahessian_optax as aho

# A quadratic L = 1/2 θᵀAθ with known eigenpairs: along a unit eigenvector
# v with eigenvalue λ, L(θ + αv) = L(θ) + α (Aθ)ᵀv + λα²/2 exactly.
_RNG = np.random.default_rng(0)
_Q = np.linalg.qr(_RNG.normal(size=(4, 4)))[0]
_LAMBDAS = np.array([3.0, 1.5, -0.5, 0.25])
_A = (_Q * _LAMBDAS) @ _Q.T
_THETA = _RNG.normal(size=4)
_A32 = jnp.asarray(_A, jnp.float32)


def _quadratic(p):
  return 0.5 * p @ _A32 @ p


def _quadratic_reference(alphas, betas=None):
  """Losses along eigenvectors 0 (and 1) of A, in float64."""
  g, l0 = _A @ _THETA, 0.5 * _THETA @ _A @ _THETA
  v1, v2 = _Q[:, 0], _Q[:, 1]
  line = lambda a, v, lam: a * (g @ v) + 0.5 * lam * a ** 2
  alphas = np.asarray(alphas, np.float64)
  if betas is None:
    return l0 + line(alphas, v1, _LAMBDAS[0])
  betas = np.asarray(betas, np.float64)
  return (l0 + line(alphas, v1, _LAMBDAS[0])[:, None]
          + line(betas, v2, _LAMBDAS[1])[None, :])


_ALPHAS = np.linspace(-0.5, 0.5, 7)  # PyHessian's range (it uses 21 points)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def test_quadratic_along_eigenvectors_outside_and_under_jit():
  theta, v1, v2 = _f32(_THETA), _f32(_Q[:, 0]), _f32(_Q[:, 1])
  alphas, betas = _ALPHAS, np.linspace(-1.0, 1.0, 5)
  # batch_size 3 does not divide 7, nor 4 divide 35.
  line = aho.loss_landscape(_quadratic, theta, [v1], alphas, batch_size=3)
  assert line.shape == (7,) and line.dtype == jnp.float32
  np.testing.assert_allclose(line, _quadratic_reference(alphas), rtol=1e-5,
                             atol=1e-5)
  # The curvature of the curve at 0 is the eigenvalue.
  h = alphas[1] - alphas[0]
  second = (line[4] - 2 * line[3] + line[2]) / h ** 2
  np.testing.assert_allclose(second, _LAMBDAS[0], rtol=1e-3)

  plane = jax.jit(lambda t, d1, d2, a, b: aho.loss_landscape(
      _quadratic, t, [d1, d2], (a, b), batch_size=4))(
          theta, v1, v2, _f32(alphas), _f32(betas))
  assert plane.shape == (7, 5)
  np.testing.assert_allclose(plane, _quadratic_reference(alphas, betas),
                             rtol=1e-5, atol=1e-5)


def _mlp_params():
  return {"w1": _f32(_RNG.normal(size=(3, 4))), "b1": jnp.full(4, 0.1),
          "w2": _f32(_RNG.normal(size=4) / 2),
          "scale": jnp.array(2, jnp.int32)}  # not a float: never moves


_X = _RNG.normal(size=(8, 3)).astype(np.float32)
_Y = _RNG.normal(size=8).astype(np.float32)


def _mlp_outputs(p):
  h = jnp.tanh(_X @ p["w1"] + p["b1"])
  return (h @ p["w2"]) * p["scale"].astype(jnp.float32)


def _mlp_loss(p):
  return jnp.mean((_mlp_outputs(p) - _Y) ** 2)


def _mlp_reference(p):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  h = np.tanh(_X.astype(np.float64) @ p["w1"] + p["b1"])
  return np.mean((h @ p["w2"] * p["scale"] - _Y) ** 2)


def _direct(params, directions, alphas, betas):
  """The reference: each point formed and evaluated on its own, NumPy."""
  d1, d2 = directions
  out = np.zeros((len(alphas), len(betas)))
  for i, a in enumerate(alphas):
    for j, b in enumerate(betas):
      point = {k: (np.asarray(v, np.float64) + a * np.asarray(d1[k], np.float64)
                   + b * np.asarray(d2[k], np.float64)) if k != "scale" else v
               for k, v in params.items()}
      out[i, j] = _mlp_reference(point)
  return out


def test_mlp_grid_matches_direct_evaluation():
  params = _mlp_params()
  axes = {"w1": -1, "b1": "zero", "w2": None, "scale": None}
  d1 = aho.filter_normalized_direction(1, params, filter_axes=axes)
  d2 = aho.filter_normalized_direction(2, params, filter_axes=axes)
  # A direction may hold anything at the integer leaf: it is not used.
  d2["scale"] = jnp.array(7, jnp.int32)
  alphas, betas = np.linspace(-1, 1, 4), np.linspace(-0.5, 0.5, 3)
  expected = _direct(params, [d1, d2], alphas, betas)

  plane = aho.loss_landscape(_mlp_loss, params, [d1, d2], (alphas, betas),
                             batch_size=5)
  np.testing.assert_allclose(plane, expected, rtol=1e-5)
  # Under jit, with the loss given as a GGN (callable: its loss).
  ggn = aho.ggn(_mlp_outputs, lambda f: jnp.mean((f - _Y) ** 2))
  jitted = jax.jit(lambda p, a, b: aho.loss_landscape(
      ggn, p, [d1, d2], (a, b), batch_size=5))(params, _f32(alphas),
                                               _f32(betas))
  np.testing.assert_allclose(jitted, expected, rtol=1e-5)


def _batch_loss(w, xb):
  return jnp.mean(0.5 * (w * xb) ** 2)


def test_dataset_loss_weights_batches_by_size():
  x = np.arange(10.0, dtype=np.float32)
  data = aho.DatasetLoss(_batch_loss, [x[:4], x[4:8], x[8:]])
  alphas = np.array([-1.0, 0.0, 0.5, 2.0])
  line = aho.loss_landscape(data, jnp.ones(()), [jnp.ones(())], alphas)
  # L(w) = mean(x^2) w^2 / 2 over all ten points.
  np.testing.assert_allclose(line, np.mean(x ** 2) * (1 + alphas) ** 2 / 2,
                             rtol=1e-6)


def test_low_precision_params_give_float32_losses():
  p = jnp.array([1.0, -2.0], jnp.bfloat16)
  line = aho.loss_landscape(lambda q: jnp.sum(q * q), p,
                            [jnp.array([1.0, 0.0], jnp.bfloat16)], [0.0, 1.0])
  assert line.dtype == jnp.float32
  np.testing.assert_allclose(line, [5.0, 8.0])


# ---------------------------------------------------------------------------
# Filter normalization.


def _filter_norms(x, axis):
  x = np.asarray(x, np.float64)
  others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  return np.sqrt(np.sum(x ** 2, axis=others))


def _layered_params():
  normal = lambda *shape: _f32(_RNG.normal(size=shape))
  return {
      "conv": {"kernel": normal(3, 3, 2, 4), "bias": normal(4)},  # Flax
      "torch_weight": normal(5, 2, 3),  # (out, in, k)
      "embed": normal(6, 2).astype(jnp.bfloat16),
      "count": jnp.array([1, 2], jnp.int32),
  }


def test_filter_norms_match_params():
  params = _layered_params()
  axes = {"conv": {"kernel": -1, "bias": "zero"}, "torch_weight": 0,
          "embed": None, "count": 0}
  d = aho.filter_normalized_direction(0, params, filter_axes=axes)
  assert jax.tree.structure(d) == jax.tree.structure(params)
  for path in (("conv", "kernel", -1), ("torch_weight", None, 0)):
    got = d[path[0]] if path[1] is None else d[path[0]][path[1]]
    want = params[path[0]] if path[1] is None else params[path[0]][path[1]]
    np.testing.assert_allclose(_filter_norms(got, path[2]),
                               _filter_norms(want, path[2]), rtol=1e-5)
    # The direction is not θ itself.
    assert not np.allclose(got, want)
  np.testing.assert_array_equal(d["conv"]["bias"], np.zeros(4))
  assert d["embed"].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(d["embed"], np.float64)),
      np.linalg.norm(np.asarray(params["embed"], np.float64)), rtol=1e-2)
  assert d["count"].dtype == jnp.int32
  np.testing.assert_array_equal(d["count"], [0, 0])

  # A function of params gives what its value gives.
  again = aho.filter_normalized_direction(0, params,
                                          filter_axes=lambda p: axes)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, d)))


def test_default_is_per_leaf_and_depends_on_key_only():
  params = {"w": _f32([[1.0, 2.0], [0.0, 3.0]]), "b": _f32([0.5, 0.0])}
  a = aho.filter_normalized_direction(5, params)
  for name in params:
    np.testing.assert_allclose(np.linalg.norm(a[name]),
                               np.linalg.norm(params[name]), rtol=1e-6)
  b = aho.filter_normalized_direction(jax.random.key(5), params)
  c = aho.filter_normalized_direction(6, params)
  np.testing.assert_array_equal(a["w"], b["w"])
  assert not np.allclose(a["w"], c["w"])


# ---------------------------------------------------------------------------
# Errors.


def test_direction_errors():
  theta = _f32(_THETA)
  v = _f32(_Q[:, 0])
  with pytest.raises(TypeError, match="list of one or two"):
    aho.loss_landscape(_quadratic, theta, v, [0.0])
  with pytest.raises(ValueError, match="one or two pytrees"):
    aho.loss_landscape(_quadratic, theta, [v, v, v], [0.0])
  with pytest.raises(ValueError, match=r"differ in shape.*v\[i\]"):
    aho.loss_landscape(_quadratic, theta, [jnp.stack([v, v])], [0.0])
  with pytest.raises(ValueError, match="same pytree structure"):
    aho.loss_landscape(_quadratic, theta, [{"w": v}], [0.0])
  with pytest.raises(TypeError, match="dtype int32"):
    aho.loss_landscape(_quadratic, theta, [jnp.ones(4, jnp.int32)], [0.0])
  # Found by evaluating (the program of the test above: no new compile).
  line = lambda t, d: aho.loss_landscape(_quadratic, t, [d], _ALPHAS,
                                         batch_size=3)
  with pytest.raises(ValueError, match=r"directions\[0\] is zero"):
    line(theta, jnp.zeros(4))
  with pytest.raises(ValueError, match=r"directions\[0\] has a non-finite"):
    line(theta, v.at[0].set(jnp.nan))
  with pytest.raises(ValueError, match="params has a non-finite"):
    line(theta.at[1].set(jnp.inf), v)
  with pytest.raises(ValueError, match="no floating-point leaf"):
    aho.loss_landscape(_quadratic, jnp.arange(4), [jnp.arange(4)], [0.0])
  with pytest.raises(TypeError, match="callable"):
    aho.loss_landscape("loss", theta, [v], [0.0])


def test_grid_errors():
  theta, v = _f32(_THETA), _f32(_Q[:, 0])
  one = lambda grid, **kw: aho.loss_landscape(_quadratic, theta, [v], grid,
                                              **kw)
  with pytest.raises(ValueError, match="1-D array"):
    one(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="1-D array"):
    one([])
  with pytest.raises(ValueError, match="non-finite coordinate"):
    one([0.0, np.nan])
  with pytest.raises(TypeError, match="real numbers"):
    one([True, False])
  with pytest.raises(ValueError, match="batch_size"):
    one([0.0], batch_size=0)
  with pytest.raises(ValueError, match=r"pair \(alphas, betas\)"):
    aho.loss_landscape(_quadratic, theta, [v, v], np.zeros(3))
  with pytest.raises(ValueError, match=r"grid\[1\] must be a non-empty 1-D"):
    aho.loss_landscape(_quadratic, theta, [v, v], ([0.0], 1.0))


def test_filter_axes_errors():
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  draw = lambda axes: aho.filter_normalized_direction(0, params,
                                                      filter_axes=axes)
  with pytest.raises(ValueError, match=r"axis 2 at \['w'\] is out of range"):
    draw({"w": 2, "b": None})
  with pytest.raises(ValueError, match=r"axis 1 at \['b'\]"):
    draw(1)
  with pytest.raises(TypeError, match=r"at \['b'\] must be an int axis"):
    draw({"w": -1, "b": "bias"})
  with pytest.raises(TypeError, match="must be an int axis"):
    draw(True)
  with pytest.raises(ValueError, match="pytree prefix"):
    draw({"kernel": -1})


class _Unhashable:
  """A loss object that cannot key a cache (it defines __eq__ only)."""

  def __eq__(self, other):
    return self is other

  def __call__(self, p):
    return _quadratic(p)


def test_unhashable_loss_is_compiled_for_the_call():
  line = aho.loss_landscape(_Unhashable(), _f32(_THETA), [_f32(_Q[:, 0])],
                            _ALPHAS)
  np.testing.assert_allclose(line, _quadratic_reference(_ALPHAS), rtol=1e-5,
                             atol=1e-5)
