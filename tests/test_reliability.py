"""Bad input, numerics, property-based tests and determinism."""

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adahessian_optax as aho

_PARAMS = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.ones((2, 2))}


def _loss(p):
  return jnp.sum(p["a"] ** 2) + jnp.sum(3.0 * p["b"] ** 2)


def _grads():
  return jax.grad(_loss)(_PARAMS)


# Both public constructors, so that every check is seen through each of them.
_FACTORIES = {
    "scale_by_adahessian": lambda **kw: aho.scale_by_adahessian(**kw),
    "adahessian": lambda **kw: aho.adahessian(0.1, **kw),
}


def _update(tx, value_fn=_loss, updates=None, params=None, state=None,
            **extra):
  params = _PARAMS if params is None else params
  state = tx.init(params) if state is None else state
  updates = _grads() if updates is None else updates
  return tx.update(updates, state, params, value_fn=value_fn, **extra)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("factory", _FACTORIES.values(), ids=_FACTORIES)
class TestBadUpdateArguments:

  def test_missing_value_fn(self, factory):
    tx = factory(key=0)
    with pytest.raises(ValueError, match="needs the loss closure: pass value_fn"):
      tx.update(_grads(), tx.init(_PARAMS), _PARAMS)

  @pytest.mark.parametrize("bad", [3.0, "loss", jnp.ones(2)])
  def test_value_fn_not_callable(self, factory, bad):
    with pytest.raises(TypeError, match="value_fn must be a callable"):
      _update(factory(key=0), value_fn=bad)

  def test_value_fn_and_obj_fn_disagree(self, factory):
    with pytest.raises(ValueError, match="both value_fn and obj_fn"):
      _update(factory(key=0), obj_fn=lambda p: _loss(p))

  def test_obj_fn_is_accepted(self, factory):
    tx = factory(key=0)
    state = tx.init(_PARAMS)
    u1, _ = tx.update(_grads(), state, _PARAMS, obj_fn=_loss)
    u2, _ = tx.update(_grads(), state, _PARAMS, value_fn=_loss)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)

  @pytest.mark.parametrize("bad", [lambda p: p["a"], lambda p: p["b"] * 2.0])
  def test_value_fn_not_scalar(self, factory, bad):
    with pytest.raises(ValueError, match="scalar loss, got shape"):
      _update(factory(key=0), value_fn=bad)

  @pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
  def test_value_fn_not_float(self, factory, dtype):
    bad = lambda p: jnp.sum(p["a"]).astype(dtype)
    with pytest.raises(TypeError, match="floating-point loss, got dtype"):
      _update(factory(key=0), value_fn=bad)

  def test_value_fn_returns_tuple(self, factory):
    with pytest.raises(TypeError, match=r"loss\(p\)\[0\]"):
      _update(factory(key=0), value_fn=lambda p: (_loss(p), {"aux": 1.0}))

  def test_params_missing(self, factory):
    tx = factory(key=0)
    with pytest.raises(ValueError, match="needs params"):
      tx.update(_grads(), tx.init(_PARAMS), None, value_fn=_loss)

  def test_updates_of_other_structure(self, factory):
    with pytest.raises(ValueError, match="same pytree structure"):
      _update(factory(key=0), updates={"a": _grads()["a"]})

  def test_updates_of_other_shape(self, factory):
    bad = {"a": jnp.ones(4), "b": _grads()["b"]}
    with pytest.raises(ValueError, match=r"differ in shape at \['a'\]"):
      _update(factory(key=0), updates=bad)

  def test_integer_updates_for_float_params(self, factory):
    bad = {"a": jnp.ones(3, jnp.int32), "b": _grads()["b"]}
    with pytest.raises(TypeError, match=r"updates at \['a'\] has dtype int32"):
      _update(factory(key=0), updates=bad)

  def test_state_of_other_params(self, factory):
    tx = factory(key=0)
    other = tx.init({"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="was the state initialised"):
      _update(tx, state=other)
    other = tx.init({"a": jnp.ones(4), "b": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"state's mu and params differ in shape"):
      _update(tx, state=other)

  @pytest.mark.parametrize("bad", [1, "yes", jnp.ones(2, bool),
                                   jnp.array(1.0)])
  def test_bad_hessian_refresh(self, factory, bad):
    with pytest.raises(TypeError, match="hessian_refresh"):
      _update(factory(key=0, update_interval=None), hessian_refresh=bad)

  def test_complex_params(self, factory):
    with pytest.raises(TypeError, match="complex parameters are not supported"):
      factory(key=0).init({"a": jnp.ones(2, jnp.complex64)})


_BAD_HYPERPARAMETERS = [
    (dict(b1=1.0), ValueError, r"b1 must lie in \[0.0, 1.0\), got 1.0"),
    (dict(b1=-0.1), ValueError, "b1 must lie in"),
    (dict(b1=float("nan")), ValueError, "b1 must be finite"),
    (dict(b1="x"), TypeError, "b1 must be a real scalar number"),
    (dict(b1=jnp.ones(2)), ValueError, "b1 must be a scalar number"),
    (dict(b2=1.0), ValueError, r"b2 must lie in \[0.0, 1.0\)"),
    (dict(b2=1.5), ValueError, "b2 must lie in"),
    (dict(b2=-1e-3), ValueError, "b2 must lie in"),
    (dict(b2=jnp.asarray(0.999, jnp.bfloat16)), TypeError,
     "b2 is a bfloat16 array.*hyperparam_dtype=jnp.float32"),
    (dict(eps=0.0), ValueError, r"eps must lie in \(0.0, inf\)"),
    (dict(eps=-1e-8), ValueError, "eps must lie in"),
    (dict(eps=float("inf")), ValueError, "eps must be finite"),
    (dict(hessian_power=1.5), ValueError, r"hessian_power must lie in \[0.0, 1.0\]"),
    (dict(hessian_power=-0.1), ValueError, "hessian_power must lie in"),
    (dict(update_interval=0), ValueError, "update_interval must be an integer >= 1"),
    (dict(update_interval=-3), ValueError, "update_interval must be an integer >= 1"),
    (dict(update_interval=1.5), TypeError, "update_interval must be an integer"),
    (dict(update_interval=True), TypeError, "update_interval must be an integer"),
    (dict(update_interval=jnp.array(0)), ValueError, "update_interval must be"),
    (dict(update_interval=jnp.array(2.0)), TypeError, "update_interval must be"),
    (dict(n_samples=0), ValueError, "n_samples must be an integer >= 1"),
    (dict(n_samples=2.0), TypeError, "n_samples must be an integer"),
    (dict(distribution="normal"), ValueError, "distribution must be one of"),
    (dict(mu_dtype=jnp.int32), TypeError, "mu_dtype must be a floating-point"),
    (dict(mu_dtype="no-such-dtype"), TypeError, "mu_dtype must be a floating"),
    (dict(key=None), ValueError, "needs `key`"),
    (dict(key="seed"), TypeError, "key must be an int seed"),
    (dict(key=1.5), TypeError, "key must be an int seed"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), ValueError,
     "key must be a single key"),
]


@pytest.mark.parametrize("factory", _FACTORIES.values(), ids=_FACTORIES)
@pytest.mark.parametrize(
    "kwargs,error,match", _BAD_HYPERPARAMETERS,
    ids=[f"{k}={v!r}"[:40] for (kw, _, _) in _BAD_HYPERPARAMETERS
         for k, v in kw.items()])
def test_bad_hyperparameters(factory, kwargs, error, match):
  kwargs = {"key": 0, **kwargs}
  with pytest.raises(error, match=match):
    factory(**kwargs)


@pytest.mark.parametrize("name", ["learning_rate", "weight_decay"])
@pytest.mark.parametrize("value,match", [
    (-0.1, r"must lie in \[0.0, inf\), got -0.1"),
    (float("nan"), "must be finite, got nan"),
    (float("inf"), "must be finite, got inf"),
    (jnp.float32(-1.0), "must lie in"),
])
def test_bad_constant_learning_rate_and_weight_decay(name, value, match):
  kwargs = {"learning_rate": 0.1, "weight_decay": 1e-4, name: value}
  with pytest.raises(ValueError, match=f"{name} {match}"):
    aho.adahessian(key=0, **kwargs)


@pytest.mark.parametrize("value,match", [
    (0.0, r"must lie in \(0.0, inf\)"), (-1.0, "must lie in"),
    (float("nan"), "must be finite"), (float("inf"), "must be finite")])
@pytest.mark.parametrize("name", ["clip_threshold", "rms_clip_threshold"])
def test_bad_clip_threshold(value, match, name):
  with pytest.raises(ValueError, match=f"{name} {match}"):
    aho.adahessian(0.1, key=0, **{name: value})


def test_schedules_are_not_checked_and_zero_is_fine():
  negative = lambda count: -0.1 * jnp.ones_like(count, jnp.float32)
  aho.adahessian(negative, weight_decay=negative, key=0)
  tx = aho.adahessian(0.0, weight_decay=0.0, key=0)
  params = jnp.ones(2)
  updates, _ = tx.update(params, tx.init(params), params, value_fn=jnp.sum)
  np.testing.assert_array_equal(updates, np.zeros(2))


@pytest.mark.parametrize("factory", _FACTORIES.values(), ids=_FACTORIES)
@pytest.mark.parametrize("rule,match", [
    (aho.block_mean(4), r"does not fit the leaf \['a'\] of shape \(3,\)"),
    ({"a": aho.block_mean(2), "b": aho.block_mean(3)},
     r"does not fit the leaf \['b'\] of shape \(2, 2\)"),
    (aho.mean_over_axes(1), r"axis 1, but the leaf \['a'\] has only 1"),
    ({"a": None, "b": aho.mean_over_axes(0, -2)},
     r"repeats an axis for the leaf \['b'\]"),
    ({"a": None, "c": None}, "spatial_averaging does not match the params"),
    ([None, None], "spatial_averaging does not match the params"),
    (lambda p: {"a": None}, "spatial_averaging does not match the params"),
    ({"a": 3, "b": None}, r"for the leaf \['a'\] is int; expected a SpatialRule"),
])
def test_averaging_rules_that_do_not_fit(factory, rule, match):
  tx = factory(key=0, spatial_averaging=rule)
  with pytest.raises((ValueError, TypeError), match=match):
    tx.init(_PARAMS)


def test_rules_ignore_non_float_leaves_and_none_nodes():
  # One rule for the whole tree: it must fit the float leaves only (an int
  # step counter is never averaged), and None nodes are empty subtrees.
  params = {"w": jnp.ones((2, 6)), "step": jnp.int32(3), "bias": None,
            "layers": [jnp.ones((3, 3)), None]}
  loss = lambda p: jnp.sum(jnp.arange(12.0).reshape(2, 6) * p["w"] ** 2) + (
      jnp.sum(p["layers"][0] ** 2))
  tx = aho.scale_by_adahessian(key=0, spatial_averaging=aho.block_mean(3))
  grads = jax.grad(loss, allow_int=True)(params)
  grads["step"] = jnp.zeros_like(params["step"])
  _, state = tx.update(grads, tx.init(params), params, value_fn=loss)
  # 2 * arange(12) averaged over blocks of 3 along the last axis.
  blocks = np.repeat((2 * np.arange(12.0)).reshape(4, 3).mean(1), 3)
  np.testing.assert_allclose(state.nu["w"], 1e-3 * blocks.reshape(2, 6) ** 2,
                             rtol=2e-5)
  np.testing.assert_allclose(state.nu["layers"][0], 1e-3 * 4.0, rtol=2e-5)
  assert state.nu["bias"] is None and state.nu["layers"][1] is None


def test_rule_checked_again_at_update_for_other_params():
  # init on params that fit; update on params where the block does not fit.
  tx = aho.scale_by_adahessian(key=0, spatial_averaging=aho.block_mean(3))
  state = tx.init({"a": jnp.ones(3)})
  small = {"a": jnp.ones(2)}
  with pytest.raises(ValueError, match="differ in shape|does not fit"):
    tx.update(small, state, small, value_fn=lambda p: jnp.sum(p["a"] ** 2))


# ------------------------------------------------------------------ numerics


def _one_step(loss, params, **kwargs):
  tx = aho.scale_by_adahessian(key=0, spatial_averaging=None, **kwargs)
  updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
                             value_fn=loss)
  return updates, state


def _first_update(grad, hess_diag, eps=1e-4, power=1.0):
  """The first AdaHessian step in float64: m_hat = g, v_hat = D^2."""
  grad = np.asarray(grad, np.float64)
  d = np.abs(np.asarray(hess_diag, np.float64))
  return grad / (d ** power + eps)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_negative_zero_and_positive_curvature(power):
  # Separable, so one Rademacher probe is exact: D = diag(H) = 2c.
  c = jnp.array([-3.0, -1e-3, 0.0, 1e-3, 2.0])
  x = jnp.array([1.0, -2.0, 0.5, 4.0, -1.5])
  loss = lambda p: jnp.sum(c * p ** 2 + 0.5 * p)
  updates, state = _one_step(loss, x, hessian_power=power)
  expected = _first_update(2 * c * x + 0.5, 2 * c, power=power)
  np.testing.assert_allclose(updates, expected, rtol=2e-6)
  # (1 - b2) is 0.99998713e-3 in float32.
  np.testing.assert_allclose(state.nu, 1e-3 * (2 * np.asarray(c)) ** 2,
                             rtol=2e-5)
  # Negative curvature is preconditioned by its magnitude: the step still
  # follows the gradient's sign (never an ascent direction).
  assert np.all(np.sign(updates) == np.sign(2 * c * x + 0.5))


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1.0, 1e12, 1e18])
def test_huge_and_tiny_curvature(scale):
  x = jnp.array([1.0, -2.0, 3.0])
  loss = lambda p: scale * jnp.sum(p ** 2)
  updates, state = _one_step(loss, x)
  np.testing.assert_allclose(updates, _first_update(2 * scale * x, 2 * scale),
                             rtol=1e-5)
  assert np.all(np.isfinite(state.nu))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_huge_and_tiny_params(scale):
  x = jnp.array([1.0, -2.0, 3.0]) * scale
  loss = lambda p: jnp.sum(p ** 2) / 2
  updates, _ = _one_step(loss, x)
  np.testing.assert_allclose(updates, _first_update(x, 1.0), rtol=1e-5)


def test_curvature_beyond_float32_range_is_discarded_and_counted():
  # D^2 overflows float32 when |D| > ~1.8e19: such an estimate is discarded
  # (nu keeps its last finite value) and counted, never stored as inf.
  x = jnp.array([1.0, 2.0])
  updates, state = _one_step(lambda p: 1e20 * jnp.sum(p ** 2), x)
  assert int(state.nonfinite_hessian_count) == 1
  assert int(state.hessian_count) == 0
  np.testing.assert_array_equal(state.nu, 0)
  np.testing.assert_array_equal(updates, 0)  # no curvature known yet


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mu_dtype", [None, jnp.float32, jnp.bfloat16])
def test_low_precision_params(dtype, mu_dtype):
  x = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype),
       "k": jnp.linspace(-1.0, 1.0, 18, dtype=dtype).reshape(3, 3, 1, 2)}
  c = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "k": 2.0}

  def loss(p):
    return sum(jnp.sum(c[n] * p[n].astype(jnp.float32) ** 2) for n in p)

  tx = aho.adahessian(0.1, key=0, mu_dtype=mu_dtype)
  state = tx.init(x)
  params = x
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss)
    params = optax.apply_updates(params, updates)
  inner = state[0]
  for n in x:
    assert updates[n].dtype == dtype and params[n].dtype == dtype
    assert inner.mu[n].dtype == (dtype if mu_dtype is None else mu_dtype)
    assert inner.nu[n].dtype == jnp.float32

  # The same run in float32 (mu in float32 too) is the reference.
  tx32 = aho.adahessian(0.1, key=0)
  state32 = tx32.init(jax.tree.map(lambda a: a.astype(jnp.float32), x))
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), x)
  for _ in range(3):
    u32, state32 = tx32.update(jax.grad(loss)(p32), state32, p32,
                               value_fn=loss)
    p32 = optax.apply_updates(p32, u32)
  for n in x:
    np.testing.assert_allclose(np.asarray(params[n], np.float32), p32[n],
                               rtol=0.03, atol=0.03)


def test_float16_estimate_is_squared_in_float32():
  # (30000 * 2)^2 overflows float16 (max 65504) but not the float32 nu.
  x = jnp.ones((3, 3, 1, 2), jnp.float16)
  loss = lambda p: jnp.sum(3e4 * p.astype(jnp.float32) ** 2)
  updates, state = _one_step(loss, x)
  assert state.nu.dtype == jnp.float32
  np.testing.assert_allclose(state.nu, 1e-3 * 6e4 ** 2, rtol=1e-3)
  np.testing.assert_allclose(updates.astype(jnp.float32), 1.0, rtol=1e-3)
  assert updates.dtype == jnp.float16


_START = jnp.array([1.0, 2.0, -1.0])


@pytest.mark.parametrize("refresh", [None, True])
def test_apply_if_finite_bad_gradient_mid_run_changes_nothing(refresh):
  # A jitted run with bad gradients inserted equals the clean run without
  # them bit for bit:
  # each rejected step leaves params and the inner state (key included) as
  # they were, so the probes that follow are the same too.
  target = jnp.array([0.5, -1.0, 2.0])
  loss = lambda p: jnp.sum((p - target) ** 2 * jnp.array([1.0, 10.0, 100.0]))
  tx = optax.apply_if_finite(aho.adahessian(
      0.2, key=0, update_interval=1 if refresh is None else None), 3)
  flag = {} if refresh is None else {"hessian_refresh": refresh}

  @jax.jit
  def step(params, state, is_bad):
    grads = jax.grad(loss)(params)
    grads = jnp.where(is_bad, grads.at[1].set(jnp.nan), grads)
    updates, state = tx.update(grads, state, params, value_fn=loss, **flag)
    return optax.apply_updates(params, updates), state

  def run(n_steps, bad_steps):
    params, state = _START, tx.init(_START)
    for i in range(n_steps):
      new_params, new_state = step(params, state, jnp.array(i in bad_steps))
      if i in bad_steps:
        np.testing.assert_array_equal(new_params, params)
        assert int(new_state.notfinite_count) == 1
        jax.tree.map(np.testing.assert_array_equal, new_state.inner_state,
                     state.inner_state)
      params, state = new_params, new_state
    return params, state

  clean_params, clean_state = run(4, ())
  params, state = run(6, (0, 3))
  np.testing.assert_array_equal(params, clean_params)
  jax.tree.map(np.testing.assert_array_equal, state.inner_state,
               clean_state.inner_state)
  assert int(state.inner_state[0].count) == 4
  assert int(state.total_notfinite) == 2


def test_apply_if_finite_with_bad_curvature_mid_run():
  # The gradient stays finite at the kink but the estimate is infinite: the
  # step goes through with the curvature known so far and nothing non-finite
  # is stored. On this separable quadratic every Rademacher probe is exact, so
  # the run must equal one in which that step skipped its refresh.
  target = jnp.array([0.5, -1.0, 2.0])
  good = lambda p: jnp.sum((p - target) ** 2 * jnp.array([1.0, 10.0, 100.0]))
  tx = optax.apply_if_finite(aho.adahessian(0.2, key=0,
                                            update_interval=None), 3)

  @functools.partial(jax.jit, static_argnames="refresh")
  def step(params, state, kink, scale, refresh=True):
    # At p == kink the gradient of |p - kink|^1.5 is 0, its Hessian infinite.
    loss = lambda p: good(p) + scale * jnp.sum(jnp.abs(p - kink) ** 1.5)
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss, hessian_refresh=refresh)
    return optax.apply_updates(params, updates), state

  far = jnp.full(3, 100.0)

  def run(bad):
    params, state = jnp.zeros(3), tx.init(jnp.zeros(3))
    for i in range(8):
      if i != 2:
        params, state = step(params, state, far, 0.0)
      elif bad:
        before = state.inner_state[0]
        params, state = step(params, state, params, 1.0)
        inner = state.inner_state[0]
        assert int(state.notfinite_count) == 0
        assert int(inner.nonfinite_hessian_count) == 1
        assert int(inner.hessian_count) == int(before.hessian_count) == 2
        np.testing.assert_array_equal(inner.nu, before.nu)
      else:
        params, state = step(params, state, far, 0.0, refresh=False)
    return params, state

  params, state = run(bad=True)
  ref_params, ref_state = run(bad=False)
  np.testing.assert_allclose(params, ref_params, rtol=1e-6)
  np.testing.assert_allclose(state.inner_state[0].nu,
                             ref_state.inner_state[0].nu, rtol=1e-6)
  assert int(state.inner_state[0].hessian_count) == 7
  assert np.all(np.isfinite(params)) and np.any(params != 0)


# ---------------------------------------- non-finite params and gradients
#
# optax.adam's contract, which AdaHessian keeps: a non-finite gradient makes
# a non-finite update (and, through the moments, every later one), so a bad
# run shows as NaN params and a NaN loss, and optax.apply_if_finite can skip
# such steps. A non-finite *curvature estimate* with a finite gradient is
# different: it is discarded and counted (nonfinite_hessian_count), since
# storing it would poison nu for good.


def _tanh_net():
  """A 3-4-1 tanh network on 8 examples: a NaN anywhere in its params makes
  the loss and every gradient NaN."""
  x = jax.random.normal(jax.random.key(0), (8, 3))
  y = jnp.sin(x[:, 0])
  params = {"w1": jax.random.normal(jax.random.key(1), (3, 4)) / 2,
            "w2": jax.random.normal(jax.random.key(2), (4,)) / 2}
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)
  return params, loss


_OPTIMIZERS = {
    "optax.adam": (lambda: optax.adam(0.01), False),
    "aho.adahessian": (lambda: aho.adahessian(0.01, key=0), True),
    "aho.adahessian, update_interval=3": (
        lambda: aho.adahessian(0.01, key=0, update_interval=3), True),
}


def _steps(make, needs_loss, loss, params, n, state=None):
  tx = make()
  state = tx.init(params) if state is None else state
  step = jax.jit(lambda p, s: tx.update(
      jax.grad(loss)(p), s, p, **({"value_fn": loss} if needs_loss else {})))
  out = []
  for _ in range(n):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return params, state, out


# optax.adam's bias correction is not clean under strict dtype promotion.
_NAMES = [pytest.param(n, marks=pytest.mark.standard_promotion)
          if n.startswith("optax") else n for n in _OPTIMIZERS]


def _all_nan(tree) -> bool:
  return all(bool(np.all(np.isnan(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", _NAMES)
def test_nan_in_params_from_the_first_step_is_nan_updates(name):
  # Before 0.6 AdaHessian's updates were 0.0 here (no finite curvature was
  # ever accepted, and the update before the first refresh is zero): a
  # silent stall. Now they are NaN, as Adam's are.
  make, needs_loss = _OPTIMIZERS[name]
  params, loss = _tanh_net()
  params["w1"] = params["w1"].at[0, 0].set(jnp.nan)
  assert np.isnan(loss(params))
  _, state, updates = _steps(make, needs_loss, loss, params, 3)
  assert all(_all_nan(u) for u in updates)
  if needs_loss:
    # Each estimate was NaN, discarded and counted; nu holds no NaN.
    refreshes = 1 if "interval" in name else 3
    assert int(state[0].nonfinite_hessian_count) == refreshes
    assert int(state[0].hessian_count) == 0
    jax.tree.map(lambda v: np.testing.assert_array_equal(v, 0), state[0].nu)


@pytest.mark.parametrize("name", _NAMES)
def test_nan_in_params_mid_run_makes_every_param_nan(name):
  make, needs_loss = _OPTIMIZERS[name]
  params, loss = _tanh_net()
  params, state, _ = _steps(make, needs_loss, loss, params, 3)
  assert np.isfinite(loss(params))
  nu_before = state[0].nu if needs_loss else None
  params["w2"] = params["w2"].at[1].set(jnp.nan)
  params, state, _ = _steps(make, needs_loss, loss, params, 1, state)
  assert _all_nan(params)
  if needs_loss and "interval" not in name:
    assert int(state[0].nonfinite_hessian_count) == 1
    assert int(state[0].hessian_count) == 3
    jax.tree.map(np.testing.assert_array_equal, state[0].nu, nu_before)


@pytest.mark.parametrize("refresh_first", [True, False])
def test_nan_gradient_with_finite_params_is_a_nan_update(refresh_first):
  # A bad batch: finite params, a NaN gradient. Its update is NaN, on the
  # first step too, whether or not that step's curvature estimate is finite.
  params, loss = _tanh_net()
  tx = aho.adahessian(0.01, key=0, update_interval=None)
  grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), jax.grad(loss)(params))
  updates, state = tx.update(grads, tx.init(params), params, value_fn=loss,
                             hessian_refresh=refresh_first)
  assert int(state[0].hessian_count) == int(refresh_first)
  for u in jax.tree.leaves(updates):
    assert np.isnan(np.asarray(u).ravel()[0])
  # With the optax guard the step is skipped instead: nothing moves.
  guarded = optax.apply_if_finite(tx, 3)
  updates, state = guarded.update(grads, guarded.init(params), params,
                                  value_fn=loss, hessian_refresh=refresh_first)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0), updates)
  assert int(state.notfinite_count) == 1
  assert int(state.inner_state[0].count) == 0


def test_finite_gradient_nonfinite_curvature_before_any_refresh_is_zero():
  # The one case with a zero update: the gradient is finite but no finite
  # curvature was ever accepted; the estimate is counted, and the first
  # finite one starts the steps.
  x = jnp.array([1.0, 2.0])
  tx = aho.adahessian(0.1, key=0)
  state = tx.init(x)
  huge = lambda p: 1e20 * jnp.sum(p ** 2)  # D^2 overflows float32
  updates, state = tx.update(jax.grad(huge)(x), state, x, value_fn=huge)
  np.testing.assert_array_equal(updates, 0)
  assert int(state[0].nonfinite_hessian_count) == 1
  fine = lambda p: jnp.sum(p ** 2)
  updates, state = tx.update(jax.grad(fine)(x), state, x, value_fn=fine)
  assert int(state[0].hessian_count) == 1
  assert np.all(updates != 0) and np.all(np.isfinite(updates))


# --------------------------------------------------- the loss given by position


def test_loss_passed_by_position_is_a_clear_type_error():
  params, loss = _tanh_net()
  tx = aho.adahessian(0.01, key=0)
  with pytest.raises(TypeError, match=r"as a keyword argument: tx\.update\("
                     r"grads, state, params, value_fn=loss_of_params\)"):
    tx.update(jax.grad(loss)(params), tx.init(params), params, loss)


def test_alias_keeps_the_chain_state_and_numbers():
  # The wrapper that catches the positional loss changes neither the state
  # (checkpoints of earlier versions load) nor a single number.
  params, loss = _tanh_net()
  tx = aho.adahessian(0.01, weight_decay=1e-3, key=0, clip_threshold=0.5)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  chain = optax.chain(
      aho.scale_by_adahessian(key=0), optax.clip(0.5),
      optax.add_decayed_weights(1e-3), optax.scale_by_learning_rate(0.01))
  s1, s2 = tx.init(params), chain.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for _ in range(3):
    g = jax.grad(loss)(params)
    u1, s1 = tx.update(g, s1, params, value_fn=loss)
    u2, s2 = chain.update(g, s2, params, value_fn=loss)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
    params = optax.apply_updates(params, u1)


# ------------------------------------------------------- property-based tests

_DTYPES = ["float32", "bfloat16", "float16", "int32"]
_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """How to build one leaf (a pytree leaf itself: not a dataclass node)."""

  shape: tuple[int, ...]
  dtype: str
  seed: int
  curvature: float


_leaves = st.builds(
    _Leaf,
    shape=st.integers(0, 5).flatmap(
        lambda rank: st.lists(st.integers(1, 3), min_size=rank,
                              max_size=rank).map(tuple)),
    dtype=st.sampled_from(_DTYPES),
    seed=st.integers(0, 2 ** 16),
    curvature=st.floats(-4.0, 4.0).filter(lambda c: abs(c) > 0.05),
)
# Nested dicts, lists and tuples of leaves, sometimes with None entries.
_trees = st.recursive(
    _leaves | st.none(),
    lambda children: (
        st.lists(children, min_size=1, max_size=3)
        | st.lists(children, min_size=1, max_size=3).map(tuple)
        | st.dictionaries(st.sampled_from("abcd"), children, min_size=1,
                          max_size=3)),
    max_leaves=10)


def _is_spec(x):
  return isinstance(x, _Leaf)


def _build(spec):
  def leaf(s):
    values = jax.random.uniform(jax.random.key(s.seed), s.shape, jnp.float32,
                                -2.0, 2.0)
    if s.dtype == "int32":
      return jnp.round(values).astype(jnp.int32)
    return values.astype(s.dtype)

  params = jax.tree.map(leaf, spec, is_leaf=_is_spec)
  specs = jax.tree.leaves(spec, is_leaf=_is_spec)

  def loss(p):
    total = jnp.zeros([], jnp.float32)
    for s, x in zip(specs, jax.tree.leaves(p)):
      if s.dtype != "int32":
        x = x.astype(jnp.float32)
        total = total + jnp.sum(s.curvature * x ** 2 + 0.25 * x)
    return total

  return params, specs, loss


@pytest.mark.slow  # a property search: six random pytrees, each compiled
@hypothesis.settings(max_examples=6, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(_trees, st.sampled_from([None, "float32"]))
def test_property_random_pytrees(spec, mu_dtype):
  # One example is a whole random tree (up to 10 leaves of rank 0 to 5), so
  # that each example compiles once.
  params, specs, loss = _build(spec)
  hypothesis.assume(len(specs) > 0)
  # scale_by_adahessian alone: optax's own transformations (weight decay,
  # scaling) are not strict-clean on integer leaves.
  tx = aho.scale_by_adahessian(key=0, mu_dtype=mu_dtype)

  @jax.jit
  def step(params):
    grads = jax.grad(loss, allow_int=True)(params)
    grads = jax.tree.map(
        lambda g, x: jnp.zeros_like(x) if g.dtype == jax.dtypes.float0 else g,
        grads, params)
    updates, state = tx.update(grads, tx.init(params), params, value_fn=loss)
    return grads, updates, state

  grads, updates, state = step(params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert int(state.hessian_count) == 1
  for s, x, g, u, m, v in zip(specs, *(jax.tree.leaves(t) for t in (
      params, grads, updates, state.mu, state.nu))):
    assert u.shape == x.shape and u.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(u, np.float32)))
    if s.dtype == "int32":
      np.testing.assert_array_equal(u, 0)
      continue
    assert v.dtype == jnp.float32
    assert m.dtype == (x.dtype if mu_dtype is None else jnp.dtype(mu_dtype))
    # Separable quadratic with a per-leaf constant curvature: one probe is
    # exact, D = |2c| before and after window averaging, and the first update
    # is g / (|2c| + eps).
    expected = np.asarray(g, np.float64) / (abs(2 * s.curvature) + 1e-4)
    np.testing.assert_allclose(np.asarray(u, np.float64), expected,
                               rtol=_TOL[s.dtype], atol=_TOL[s.dtype])


# --------------------------------------------------------------- determinism


def _mlp_problem():
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  params = {"w1": jax.random.normal(k1, (4, 8)), "b1": jnp.zeros(8),
            "w2": jax.random.normal(k2, (8, 1))}
  x = jax.random.normal(k3, (32, 4))
  y = jnp.sin(x[:, :1])

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y) ** 2)

  return params, loss


def _make_step(tx, loss):
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss)
    return optax.apply_updates(params, updates), state
  return step


def _run(tx, steps=4, jit=True, state=None):
  params, loss = _mlp_problem()
  state = tx.init(params) if state is None else state

  step = _make_step(tx, loss)
  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


_VARIANTS = {
    "default": dict(),
    "gaussian-probes-interval-blocks": dict(
        distribution="gaussian", n_samples=2, update_interval=2,
        spatial_averaging={"w1": aho.block_mean(3), "b1": None,
                           "w2": aho.block_mean(3, axis=0)}),
}


@pytest.mark.parametrize("kwargs", _VARIANTS.values(), ids=_VARIANTS)
def test_same_key_same_run(kwargs):
  params, loss = _mlp_problem()
  txs = [aho.adahessian(0.05, key=k, **kwargs)
         for k in (7, jax.random.key(7), jax.random.PRNGKey(7), 8)]
  states = [tx.init(params) for tx in txs]
  # update() reads the key from the state only, so one compiled step serves
  # all four optimizers.
  step = jax.jit(_make_step(txs[0], loss))
  runs = []
  for state in states:
    p = params
    for _ in range(4):
      p, state = step(p, state)
    runs.append((p, state))
  for other in runs[1:3]:
    jax.tree.map(np.testing.assert_array_equal, runs[0], other)
  assert not np.array_equal(runs[0][0]["w1"], runs[3][0]["w1"])
  assert not np.array_equal(runs[0][1][0].estimator.key,
                            runs[3][1][0].estimator.key)
  if not kwargs:
    # A fresh step function (a new trace and compilation) gives the same run.
    jax.tree.map(np.testing.assert_array_equal, runs[0], _run(txs[1]))


@pytest.mark.slow  # the optimizer op by op outside jit
def test_jit_and_no_jit_agree():
  tx = aho.adahessian(0.05, key=7, n_samples=2)
  jitted = _run(tx, steps=2, jit=True)
  eager = _run(tx, steps=2, jit=False)
  # Same probes (the key chain is exact integer arithmetic) ...
  np.testing.assert_array_equal(jitted[1][0].estimator.key,
                                eager[1][0].estimator.key)
  np.testing.assert_array_equal(jitted[1][0].hessian_count,
                                eager[1][0].hessian_count)
  # ... and the same numbers up to float32 rounding (XLA fuses under jit).
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-6), jitted, eager)
