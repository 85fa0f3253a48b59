"""scale_by_adahessian / adahessian against an independent NumPy version."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adahessian_optax as aho
from adahessian_optax import _probes

# --- A separable loss: its exact Hessian diagonal is known in closed form, so
# one Rademacher probe is exact and the NumPy reference needs no probes.

SHAPES = {"conv": (2, 2, 3, 4), "dense": (5, 6), "bias": (6,)}


def _coefficients(seed=0):
  rng = np.random.default_rng(seed)
  coef = {}
  for name, shape in SHAPES.items():
    coef[name] = dict(
        a=rng.uniform(0.5, 2.0, shape),
        c=rng.uniform(-1.0, 3.0, shape),  # some negative curvature
        s=rng.normal(size=shape),
    )
  return coef


def _params0(seed=1):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _jax_loss(coef):
  def loss(p):
    total = 0.0
    for k in SHAPES:
      a, c, s = (jnp.asarray(coef[k][n]) for n in "acs")
      total = total + jnp.sum(a * p[k] ** 4 / 12 + c * p[k] ** 2 / 2 + s * p[k])
    return total
  return loss


def _np_grad(coef, p):
  return {k: coef[k]["a"] * p[k] ** 3 / 3 + coef[k]["c"] * p[k] + coef[k]["s"]
          for k in p}


def _np_diag(coef, p):
  return {k: coef[k]["a"] * p[k] ** 2 + coef[k]["c"] for k in p}


def _np_block_mean(x, b):
  out = np.empty_like(x)
  for start in range(0, x.shape[-1], b):
    out[..., start:start + b] = x[..., start:start + b].mean(-1, keepdims=True)
  return out


NP_RULES = {
    "conv": lambda x: np.broadcast_to(x.mean((0, 1), keepdims=True), x.shape),
    "dense": lambda x: _np_block_mean(x, 4),
    "bias": lambda x: x,
}
JAX_RULES = {"conv": aho.conv_window_mean(), "dense": aho.block_mean(4),
             "bias": None}


def numpy_adahessian(coef, p, steps, *, lr, b1, b2, eps, power, wd,
                     interval=1, wd_mask=None, grad_hook=None, lr_fn=None,
                     clip=None, rms_clip=None):
  """The paper's update, written out in NumPy."""
  p = {k: v.copy() for k, v in p.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  refreshes = 0
  trajectory = []
  for t in range(steps):
    g = _np_grad(coef, p)
    if grad_hook is not None:
      g = grad_hook(g)
    if t % interval == 0:
      d = _np_diag(coef, p)
      for k in p:
        dk = NP_RULES[k](np.abs(d[k]))
        v[k] = b2 * v[k] + (1 - b2) * dk * dk
      refreshes += 1
    step_lr = lr if lr_fn is None else lr_fn(t)
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      m_hat = m[k] / (1 - b1 ** (t + 1))
      v_hat = v[k] / (1 - b2 ** refreshes)
      u = m_hat / (v_hat ** (power / 2) + eps)
      if clip is not None:
        u = np.clip(u, -clip, clip)
      if rms_clip is not None:
        u = u * min(1.0, rms_clip / np.sqrt(np.mean(u ** 2)))
      decay = wd if wd_mask is None or wd_mask[k] else 0.0
      p[k] = p[k] - step_lr * (u + decay * p[k])
    trajectory.append({k: x.copy() for k, x in p.items()})
  return trajectory


def run_optax(tx, loss, p, steps, *, refresh_fn=None, jit=True):
  params = {k: jnp.asarray(x) for k, x in p.items()}
  state = tx.init(params)

  def step(params, state, refresh):
    grads = jax.grad(loss)(params)
    flag = {} if refresh is None else {"hessian_refresh": refresh}
    updates, state = tx.update(grads, state, params, value_fn=loss, **flag)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step, static_argnums=2)
  trajectory = []
  for t in range(steps):
    refresh = None if refresh_fn is None else refresh_fn(t)
    params, state = step(params, state, refresh)
    trajectory.append(params)
  return trajectory, state


def assert_trajectories_close(got, want, rtol=1e-9, atol=1e-12):
  assert len(got) == len(want)
  for t, (g, w) in enumerate(zip(got, want)):
    for k in w:
      np.testing.assert_allclose(np.asarray(g[k]), w[k], rtol=rtol, atol=atol,
                                 err_msg=f"step {t}, leaf {k}")


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield


CASES = [
    dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-4, power=1.0, wd=0.0),
    dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-2, power=0.5, wd=1e-2),
    dict(lr=0.2, b1=0.0, b2=0.5, eps=1e-8, power=0.0, wd=0.0),
    dict(lr=0.1, b1=0.95, b2=0.9, eps=0.3, power=0.7, wd=0.1),
]


@pytest.mark.parametrize("case, n_samples", [(c, 1) for c in CASES] +
                         [(CASES[1], 3)])
def test_matches_numpy_reference(x64, case, n_samples):
  coef, p0 = _coefficients(), _params0()
  want = numpy_adahessian(coef, p0, 12, **case)
  tx = aho.adahessian(
      case["lr"], b1=case["b1"], b2=case["b2"], eps=case["eps"],
      weight_decay=case["wd"], hessian_power=case["power"], key=4,
      spatial_averaging=JAX_RULES, n_samples=n_samples)
  got, state = run_optax(tx, _jax_loss(coef), p0, 12)
  assert_trajectories_close(got, want)
  inner = state[0]
  assert int(inner.count) == 12 and int(inner.hessian_count) == 12


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("static", [True, False])
def test_update_interval_matches_numpy_reference(x64, interval, static):
  coef, p0 = _coefficients(2), _params0(3)
  case = CASES[1]
  want = numpy_adahessian(coef, p0, 10, interval=interval, **case)
  # Static: the caller decides each refresh (update_interval=None) with a
  # Python bool; otherwise the transformation's schedule, at run time.
  tx = aho.adahessian(
      case["lr"], b1=case["b1"], b2=case["b2"], eps=case["eps"],
      weight_decay=case["wd"], hessian_power=case["power"], key=0,
      spatial_averaging=JAX_RULES,
      update_interval=None if static else interval)
  refresh_fn = (lambda t: t % interval == 0) if static else None
  got, state = run_optax(tx, _jax_loss(coef), p0, 10, refresh_fn=refresh_fn)
  assert_trajectories_close(got, want)
  assert int(state[0].hessian_count) == len(range(0, 10, interval))


def test_skipped_refresh_runs_no_hessian_product():
  calls = []

  def loss(p):
    calls.append(1)  # counts traces of the closure
    return jnp.sum(p ** 2)

  manual = aho.scale_by_adahessian(key=0, update_interval=None)
  params = jnp.ones(3)
  state = manual.init(params)
  jaxpr = jax.make_jaxpr(
      lambda s: manual.update(params, s, params, value_fn=loss,
                              hessian_refresh=False))(state)
  assert not calls and "cond" not in str(jaxpr)
  scheduled = aho.scale_by_adahessian(key=0, update_interval=2)
  jaxpr = jax.make_jaxpr(
      lambda s: scheduled.update(params, s, params, value_fn=loss))(state)
  assert calls and "cond" in str(jaxpr)


def test_no_curvature_before_first_refresh_means_zero_step():
  tx = aho.scale_by_adahessian(key=0, update_interval=None)
  params = jnp.ones(3)
  state = tx.init(params)
  updates, state = tx.update(params, state, params, value_fn=jnp.sum,
                             hessian_refresh=False)
  np.testing.assert_array_equal(updates, np.zeros(3))
  assert int(state.hessian_count) == 0


def test_non_separable_with_probes_reproduced_in_numpy(x64):
  """Probes are drawn from the state key: split, then the probe draw."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(7, 7))
  a = q @ q.T + np.eye(7)
  b = rng.normal(size=7)
  shapes = {"u": (3,), "w": (2, 2)}

  def flat(p):
    return jnp.concatenate([p["u"], p["w"].reshape(-1)])

  loss = lambda p: 0.5 * flat(p) @ jnp.asarray(a) @ flat(p) + jnp.asarray(b) @ flat(p)
  lr, b1, b2, eps, n = 0.1, 0.9, 0.99, 1e-3, 2
  tx = aho.adahessian(lr, b1=b1, b2=b2, eps=eps, key=9, n_samples=n,
                      distribution="gaussian", spatial_averaging=None)
  p0 = {k: rng.normal(size=s) for k, s in shapes.items()}
  got, _ = run_optax(tx, loss, p0, 6)

  key = jax.random.key_data(jax.random.key(9))
  x = np.concatenate([p0["u"], p0["w"].reshape(-1)])
  m = np.zeros(7)
  v = np.zeros(7)
  for t in range(6):
    key, probe_key = _probes.split(key)
    d = np.zeros(7)
    leaves = [jnp.zeros(shapes["u"]), jnp.zeros(shapes["w"])]
    for z in _probes.gaussian(probe_key, leaves, n):
      z = np.concatenate([np.asarray(z[0]), np.asarray(z[1]).reshape(-1)])
      d += z * (a @ z) / n
    g = a @ x + b
    v = b2 * v + (1 - b2) * d ** 2
    m = b1 * m + (1 - b1) * g
    u = (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    x = x - lr * u
    np.testing.assert_allclose(flat(got[t]), x, rtol=1e-9, err_msg=f"step {t}")


@pytest.mark.parametrize("option,value,seed", [
    ("clip_threshold", 0.3, 11), ("rms_clip_threshold", 0.05, 13)])
def test_clips_match_numpy_reference(x64, option, value, seed):
  coef, p0 = _coefficients(seed), _params0(seed + 1)
  case = dict(CASES[0], wd=0.01)
  reference = {"clip_threshold": "clip", "rms_clip_threshold": "rms_clip"}
  want = numpy_adahessian(coef, p0, 10, **{reference[option]: value}, **case)
  unclipped = numpy_adahessian(coef, p0, 10, **case)
  # The clip is active: the runs differ.
  assert max(np.abs(want[-1][k] - unclipped[-1][k]).max() for k in p0) > 1e-3
  tx = aho.adahessian(case["lr"], weight_decay=case["wd"], key=0,
                      spatial_averaging=JAX_RULES, **{option: value})
  got, _ = run_optax(tx, _jax_loss(coef), p0, 10)
  assert_trajectories_close(got, want)


# --- Composition with other optax transformations.


def test_chain_with_clip_by_global_norm(x64):
  coef, p0 = _coefficients(5), _params0(6)
  case = CASES[0]

  def clip(g):
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    return {k: x * min(1.0, 0.5 / norm) for k, x in g.items()}

  want = numpy_adahessian(coef, p0, 8, grad_hook=clip, **case)
  tx = optax.chain(
      optax.clip_by_global_norm(0.5),
      aho.adahessian(case["lr"], key=1, spatial_averaging=JAX_RULES))
  got, _ = run_optax(tx, _jax_loss(coef), p0, 8)
  assert_trajectories_close(got, want)


@pytest.mark.standard_promotion
def test_warmup_cosine_schedule_and_weight_decay_mask(x64):
  coef, p0 = _coefficients(7), _params0(8)
  peak, warm, total, end = 0.2, 3, 10, 0.01

  def lr_fn(t):  # warmup from 0, then cosine down to `end`, written out
    if t < warm:
      return peak * t / warm
    frac = (t - warm) / (total - warm)
    return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))

  mask = {"conv": True, "dense": True, "bias": False}
  want = numpy_adahessian(coef, p0, total, lr=None, b1=0.9, b2=0.999,
                          eps=1e-4, power=1.0, wd=0.05, wd_mask=mask,
                          lr_fn=lr_fn)
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warm, total, end)
  tx = aho.adahessian(schedule, weight_decay=0.05, weight_decay_mask=mask,
                      key=2, spatial_averaging=JAX_RULES)
  got, _ = run_optax(tx, _jax_loss(coef), p0, total)
  # optax evaluates schedules in float32.
  assert_trajectories_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # a composition: injected runs against plain ones
def test_inject_hyperparams_same_numbers_and_changeable():
  coef, p0 = _coefficients(9), _params0(10)
  loss = _jax_loss(coef)
  p0 = {k: x.astype(np.float32) for k, x in p0.items()}
  plain = aho.adahessian(0.1, key=3)
  injected = optax.inject_hyperparams(aho.adahessian, static_args=("n_samples",))(
      learning_rate=0.1, key=3)
  want, _ = run_optax(plain, loss, p0, 5)
  got, state = run_optax(injected, loss, p0, 5)
  # To rounding: a traced rate and a folded constant may round differently.
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=1e-7)

  params = got[-1]
  grads = jax.grad(loss)(params)
  u1, _ = injected.update(grads, state, params, value_fn=loss)
  state.hyperparams["learning_rate"] = jnp.asarray(0.025)
  u2, _ = injected.update(grads, state, params, value_fn=loss)
  for k in u1:
    np.testing.assert_allclose(u2[k], u1[k] / 4, rtol=1e-6)


def test_apply_if_finite_rejects_bad_gradient():
  loss = lambda p: jnp.sum(p ** 4) / 4 + jnp.sum(p ** 2)
  tx = optax.apply_if_finite(aho.adahessian(0.1, key=0), max_consecutive_errors=5)
  params = jnp.array([1.0, -2.0])
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))
  updates, good_state = step(jax.grad(loss)(params), state, params)
  params = optax.apply_updates(params, updates)

  updates, state = step(jnp.array([jnp.nan, 1.0]), good_state, params)
  np.testing.assert_array_equal(updates, np.zeros(2))
  assert int(state.notfinite_count) == 1
  for a, b in zip(jax.tree.leaves(state.inner_state),
                  jax.tree.leaves(good_state.inner_state)):
    np.testing.assert_array_equal(a, b)
  updates, state = step(jax.grad(loss)(params), state, params)
  assert np.all(np.isfinite(updates)) and np.any(updates != 0)
  assert int(state.notfinite_count) == 0


def test_non_finite_hessian_estimate_is_discarded_and_counted():
  loss = lambda p: jnp.sum(p ** 4) / 4 + jnp.sum(p ** 2)
  bad_curvature = lambda p: loss(p) + jnp.sum(jnp.sqrt(p - 10.0) ** 2)
  tx = aho.scale_by_adahessian(key=0)
  params = jnp.array([1.0, -2.0])
  state = tx.init(params)
  step = jax.jit(lambda s, f: tx.update(jax.grad(loss)(params), s, params,
                                        value_fn=f), static_argnums=1)
  good_updates, good = step(state, loss)
  updates, bad = step(good, bad_curvature)
  assert int(bad.nonfinite_hessian_count) == 1
  assert int(bad.hessian_count) == int(good.hessian_count) == 1
  np.testing.assert_array_equal(bad.nu, good.nu)
  # Next refresh: new probes.
  assert not np.array_equal(bad.estimator.key, good.estimator.key)
  # The step uses the curvature known so far: |diag H| = 3 p^2 + 2.
  d = 3 * np.array([1.0, 4.0]) + 2
  g = np.array([3.0, -12.0])
  m = 0.9 * 0.1 * g + 0.1 * g
  np.testing.assert_allclose(updates, (m / (1 - 0.9 ** 2)) / (d + 1e-4),
                             rtol=1e-5)
  np.testing.assert_allclose(good_updates, g / (d + 1e-4), rtol=1e-5)


def test_jitted_step_does_not_recompile():
  traces = []
  tx = aho.adahessian(0.1, key=0, update_interval=2)
  loss = lambda p: jnp.sum(jnp.cos(p))

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss)
    return optax.apply_updates(params, updates), state

  params = jnp.ones(4)
  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


def test_update_requires_closure_and_params():
  tx = aho.adahessian(0.1, key=0)
  params = jnp.ones(2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state, None, value_fn=jnp.sum)
  with pytest.raises(ValueError, match="both value_fn and obj_fn"):
    tx.update(params, state, params, value_fn=jnp.sum, obj_fn=jnp.mean)
  updates, _ = tx.update(params, state, params, obj_fn=lambda p: jnp.sum(p**2))
  np.testing.assert_allclose(updates, -0.1 / (2 + 1e-4) * np.ones(2),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="key"):
    aho.adahessian(0.1)


# --- Convergence.


def _steps_until_within(tx, loss, x0, optimum, steps, tol):
  """First step after which loss - optimum stays <= tol (None if never)."""
  state = tx.init(x0)

  def body(carry, _):
    x, s = carry
    u, s = tx.update(jax.grad(loss)(x), s, x, value_fn=loss)
    x = optax.apply_updates(x, u)
    return (x, s), loss(x) - optimum

  _, gaps = jax.jit(lambda: jax.lax.scan(body, (x0, state), None,
                                         length=steps))()
  bad = np.nonzero(np.asarray(gaps) > tol)[0]
  if len(bad) == 0:
    return 1
  return None if bad[-1] == steps - 1 else int(bad[-1]) + 2


@pytest.mark.slow  # a convergence race of up to thousands of steps
@pytest.mark.standard_promotion
def test_ill_conditioned_quadratic_needs_10x_fewer_steps_than_adam(x64):
  # Curvatures 1 ... 1e4 (condition number 1e4); optimum coordinates of
  # magnitudes 1e-2 ... 1e2 with alternating signs.
  curvature = jnp.logspace(0, 4, 20)
  target = jnp.logspace(-2, 2, 20) * jnp.where(jnp.arange(20) % 2 == 0, 1, -1)
  loss = lambda x: 0.5 * jnp.sum(curvature * (x - target) ** 2)
  x0 = jnp.zeros(20)
  grid = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
  budget = 20000
  ada = [_steps_until_within(aho.adahessian(lr, key=0), loss, x0, 0.0, 2000,
                             1e-6) for lr in grid]
  adam = [_steps_until_within(optax.adam(lr), loss, x0, 0.0, budget, 1e-6)
          for lr in grid]
  best_ada = min(s for s in ada if s is not None)
  best_adam = min([s for s in adam if s is not None] + [budget])
  assert best_ada <= 400, ada
  assert 10 * best_ada <= best_adam, (ada, adam)


def test_rosenbrock_converges(x64):
  rosenbrock = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
  tx = aho.adahessian(2.0, key=0)
  x0 = jnp.array([-1.5, 2.0])
  state = tx.init(x0)

  def body(carry, _):
    x, s = carry
    u, s = tx.update(jax.grad(rosenbrock)(x), s, x, value_fn=rosenbrock)
    return (optax.apply_updates(x, u), s), None

  (x, _), _ = jax.jit(lambda: jax.lax.scan(body, (x0, state), None,
                                           length=5000))()
  np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-3)
  assert rosenbrock(x) < 1e-6


# --- The fused step: value_grad_and_hessian + update(hessian=...).


def _fused_problem():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(9, 9))
  a = jnp.asarray(q @ q.T / 9 + np.eye(9), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}

  def loss(p):
    x = jnp.concatenate([p["w"].reshape(-1), p["b"]])
    return 0.5 * x @ a @ x + jnp.sum(jnp.sin(x))
  return params, loss


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(key=jax.random.key(5)), [True] * 5),
    (dict(key=5, update_interval=None), [True, False, False, True, False]),
    (dict(estimator=aho.hutchinson_estimator(5, n_samples=3)), [True] * 4),
    (dict(key=5, distribution="gaussian", n_samples=2), [True] * 4),
])
def test_fused_step_gives_the_plain_step_s_numbers(kwargs, pattern):
  params, loss = _fused_problem()
  tx = optax.chain(optax.clip_by_global_norm(5.0),
                   aho.adahessian(0.1, **kwargs))
  manual = kwargs.get("update_interval", 1) is None

  @functools.partial(jax.jit, static_argnames="refresh")
  def plain(p, s, refresh):
    flag = {"hessian_refresh": refresh} if manual else {}
    u, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss, **flag)
    return optax.apply_updates(p, u), s

  @functools.partial(jax.jit, static_argnames="refresh")
  def fused(p, s, refresh):
    if not refresh:
      u, s = tx.update(jax.grad(loss)(p), s, p, hessian_refresh=False)
      return optax.apply_updates(p, u), s
    _, g, h = aho.value_grad_and_hessian(loss, p, s)
    u, s = tx.update(g, s, p, hessian=h)
    return optax.apply_updates(p, u), s

  pa, sa = params, tx.init(params)
  pb, sb = params, tx.init(params)
  for refresh in pattern:
    pa, sa = plain(pa, sa, refresh)
    pb, sb = fused(pb, sb, refresh)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb))):
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)
  assert int(sb[1][0].hessian_count) == sum(pattern)
  assert _max_diff(pb, params) > 0.1


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_value_grad_and_hessian_against_jax_hessian():
  params, loss = _fused_problem()
  tx = aho.scale_by_adahessian(
      estimator=aho.hutchinson_estimator(2, n_samples=2))
  state = tx.init(params)
  value, grad, hessian = aho.value_grad_and_hessian(loss, params, state)
  np.testing.assert_allclose(value, loss(params), rtol=1e-6)
  for k in params:
    np.testing.assert_allclose(grad[k], jax.grad(loss)(params)[k], rtol=1e-5)
  flat = lambda t: jnp.concatenate([t["w"].reshape(-1), t["b"]])
  h = np.asarray(jax.hessian(lambda x: loss(
      {"w": x[:6].reshape(3, 2), "b": x[6:]}))(flat(params)), np.float64)
  # The configuration comes from the state: two Rademacher probes, drawn
  # from the probe half of the state key's split (float leaves in tree
  # order: b, then w).
  next_key, probe_key = _probes.split(state.estimator.key)
  want = 0.0
  for z in _probes.rademacher(probe_key, [params["b"], params["w"]], 2):
    z = np.concatenate([np.asarray(z[1]).reshape(-1), np.asarray(z[0])])
    want = want + z * (h @ z) / 2
  np.testing.assert_allclose(flat(hessian.diagonal), want, rtol=1e-4,
                             atol=1e-5)
  assert hessian.estimator.estimator.n_samples == 2
  np.testing.assert_array_equal(hessian.estimator.key, next_key)
  # update adopts the advanced estimator state.
  _, new_state = tx.update(grad, state, params, hessian=hessian)
  np.testing.assert_array_equal(new_state.estimator.key, next_key)


def test_fused_step_under_inject_hyperparams_and_masked():
  params, loss = _fused_problem()
  inner = optax.inject_hyperparams(
      aho.adahessian, static_args=("update_interval",))(learning_rate=0.1,
                                                         key=1)
  tx = optax.masked(inner, {"w": True, "b": False})
  state = tx.init(params)
  _, g, h = aho.value_grad_and_hessian(loss, params, state)
  u, _ = tx.update(g, state, params, hessian=h)
  # First step: m_hat = g and v_hat = D^2 with D = |diagonal| (a dense
  # kernel is not averaged), so u = -lr g / (|D| + eps) on the unmasked leaf.
  want = -0.1 * np.asarray(g["w"]) / (np.abs(np.asarray(h.diagonal["w"]))
                                      + 1e-4)
  np.testing.assert_allclose(u["w"], want, rtol=1e-5)
  np.testing.assert_array_equal(u["b"], g["b"])  # masked out: passed through


def test_fused_step_errors_name_the_problem():
  params, loss = _fused_problem()
  tx = aho.scale_by_adahessian(key=0)
  state = tx.init(params)
  _, g, h = aho.value_grad_and_hessian(loss, params, state)
  other = aho.scale_by_adahessian(key=0, n_samples=3)
  with pytest.raises(ValueError, match="another estimator's state"):
    other.update(g, other.init(params), params, hessian=h)
  with pytest.raises(ValueError, match="already schedules"):
    tx.update(g, state, params, hessian=h, hessian_refresh=True)
  manual = aho.scale_by_adahessian(key=0, update_interval=None)
  with pytest.raises(ValueError, match="hessian_refresh=False; passing an"):
    manual.update(g, state, params, hessian=h, hessian_refresh=False)
  with pytest.raises(ValueError, match="hessian_refresh=Array"):
    manual.update(g, state, params, hessian=h,
                  hessian_refresh=jnp.array(True))
  with pytest.raises(ValueError, match="update_interval=3 whether this step"):
    aho.scale_by_adahessian(key=0, update_interval=3).update(
        g, state, params, hessian=h)
  with pytest.raises(ValueError, match="both hessian= and a loss closure"):
    tx.update(g, state, params, hessian=h, value_fn=loss)
  with pytest.raises(TypeError, match="HessianEstimate.*got dict"):
    tx.update(g, state, params, hessian=g)
  with pytest.raises(ValueError, match="hessian.diagonal and params"):
    tx.update(g, state, params,
              hessian=aho.HessianEstimate({"w": g["w"]}, h.estimator))
  with pytest.raises(ValueError, match="holds no EstimatorState"):
    aho.value_grad_and_hessian(loss, params, optax.adam(1.0).init(params))
  two = (state, state)
  with pytest.raises(ValueError, match="holds 2 EstimatorState"):
    aho.value_grad_and_hessian(loss, params, two)
  with pytest.raises(ValueError, match="needs the loss closure"):
    tx.update(g, state, params)  # neither hessian nor value_fn
  # Without a refresh, no closure is needed.
  u, s = manual.update(g, state, params, hessian_refresh=False)
  assert int(s.hessian_count) == 0


# --- The refresh rule and its dispatcher.


def test_estimator_is_configured_in_one_place():
  est = aho.hutchinson_estimator(3, n_samples=2, distribution="gaussian")
  params = jnp.ones(2)
  state = aho.adahessian(0.1, estimator=est).init(params)[0]
  assert (state.estimator.estimator.n_samples,
          state.estimator.estimator.distribution) == (
      2, "gaussian")
  # The 0.1 keywords build the same estimator.
  same = aho.adahessian(0.1, key=3, n_samples=2,
                        distribution="gaussian").init(params)[0]
  assert jax.tree.structure(same) == jax.tree.structure(state)
  np.testing.assert_array_equal(same.estimator.key, state.estimator.key)
  for kwargs in (dict(key=0), dict(n_samples=2), dict(distribution="gaussian"),
                 dict(axis_name="i")):
    with pytest.raises(ValueError, match="estimator= and also"):
      aho.adahessian(0.1, estimator=est, **kwargs)
  with pytest.raises(TypeError, match="estimator must be"):
    aho.adahessian(0.1, estimator="hutchinson")


def test_any_transformation_whose_update_is_the_estimate_is_an_estimator():
  # Sophia's hessian_diagonal_fn contract: here the exact diagonal.
  loss = lambda p: jnp.sum(jnp.array([1.0, 4.0]) * p ** 2) + p[0] * p[1]

  def update(updates, state, params=None, *, value_fn=None, **extra):
    del updates, extra
    return jnp.diag(jax.hessian(value_fn)(params)), state + 1

  exact = optax.GradientTransformationExtraArgs(lambda p: jnp.int32(0),
                                                update)
  tx = aho.adahessian(0.1, estimator=exact)
  params = jnp.array([1.0, -2.0])
  state = tx.init(params)
  g = jax.grad(loss)(params)
  updates, state = tx.update(g, state, params, value_fn=loss)
  # m_hat = g, v_hat = D^2 after one step: the update is -lr g / (|D| + eps).
  np.testing.assert_allclose(updates, -0.1 * g / (np.array([2.0, 8.0]) + 1e-4),
                             rtol=1e-6)
  assert int(state[0].estimator) == 1
  # The fused step needs this library's estimator state.
  with pytest.raises(ValueError, match="holds no EstimatorState"):
    aho.value_grad_and_hessian(loss, params, state)


@pytest.mark.parametrize("interval,flag,hessian,want", [
    (1, None, False, True),          # every step, known when tracing
    (1, None, True, True),           # the fused step on every step
    (None, True, False, True),       # the caller decides, statically
    (None, False, False, False),
    (None, None, True, True),        # an estimate given is a refresh
    (None, True, True, True),
    (3, None, False, "count % 3"),   # decided at run time
])
def test_refresh_rule(interval, flag, hessian, want):
  from adahessian_optax.optimizer import _refresh  # pylint: disable=import-outside-toplevel
  count = jnp.int32(6)
  got = _refresh.refresh_predicate(interval, count, flag,
                                      object() if hessian else None)
  if want == "count % 3":
    assert isinstance(got, jax.Array) and bool(got)
    assert not bool(_refresh.refresh_predicate(3, count + 1, None, None))
  else:
    assert got is want


@pytest.mark.parametrize("interval,flag,hessian,match", [
    (1, True, False, "already schedules"),
    (2, False, False, "already schedules"),
    (2, None, True, "decided at run time"),
    (jnp.asarray(1), None, True, "decided at run time"),
    (None, None, False, "decides each refresh"),
    (None, False, True, "passing an estimate refreshes"),
])
def test_contradictory_refresh_inputs_are_errors(interval, flag, hessian,
                                                 match):
  from adahessian_optax.optimizer import _refresh  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=match):
    _refresh.refresh_predicate(interval, jnp.int32(0), flag,
                                  object() if hessian else None)


def _conv_problem():
  """A convolution with a ridge term: the ridge keeps every curvature
  estimate near 1, away from 0, where AdaHessian's step 1/|D| would turn
  the rounding differences of two programs into differences in the run."""
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4)) * 0.3
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))

  def loss(k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(y) ** 2) + 0.5 * jnp.sum(k ** 2)
  return kernel, loss


def _run_interval(loss, params, steps, interval):
  tx = aho.adahessian(0.05, key=0, update_interval=interval)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                        value_fn=loss))
  state = tx.init(params)
  out = []
  for _ in range(steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state, step


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the convolutions are rewritten on XLA:CPU only")
def test_run_time_refresh_of_a_convolution_on_cpu_uses_a_fast_cond():
  """update_interval=3 on a convolution: one lax.cond whose refresh branch
  holds only convolutions in XLA:CPU's fast layout (no warning), and the
  run of the caller's static decision on the same steps."""
  from adahessian_optax import _xla_cpu  # pylint: disable=import-outside-toplevel
  kernel, loss = _conv_problem()
  # The suite turns warnings into errors, so the run below also checks that
  # none is emitted.
  got, state, _ = _run_interval(loss, kernel, 7, 3)
  tx = aho.adahessian(0.05, key=0, update_interval=3)
  jaxpr = jax.make_jaxpr(lambda p, s: tx.update(
      jax.grad(loss)(p), s, p, value_fn=loss))(kernel, tx.init(kernel)).jaxpr
  assert str(jaxpr).count(" cond[") == 1
  in_cond = [n for within, n in _xla_cpu.convolutions(jaxpr)
             if "cond" in within]
  assert len(in_cond) >= 3  # the forward, and the backward's two kinds
  assert all(n == _xla_cpu._canonical_numbers(4)  # pylint: disable=protected-access
             for n in in_cond)
  assert int(state[0].hessian_count) == 3
  manual = aho.adahessian(0.05, key=0, update_interval=None)
  mstep = jax.jit(lambda p, s, r: manual.update(
      jax.grad(loss)(p), s, p, value_fn=loss, hessian_refresh=r),
                  static_argnums=2)
  params, mstate = kernel, manual.init(kernel)
  for t in range(7):
    u, mstate = mstep(params, mstate, t % 3 == 0)
    params = optax.apply_updates(params, u)
    np.testing.assert_allclose(params, got[t], rtol=1e-5, atol=1e-7)
  # The estimator's key advances only on refresh steps.
  np.testing.assert_array_equal(mstate[0].estimator.key,
                                state[0].estimator.key)


def test_run_time_refresh_without_convolution_uses_cond():
  params, loss = _fused_problem()
  tx = aho.adahessian(0.05, key=0, update_interval=2)
  text = str(jax.make_jaxpr(lambda p, s: tx.update(
      jax.grad(loss)(p), s, p, value_fn=loss))(params, tx.init(params)))
  assert " cond[" in text


@pytest.mark.standard_promotion  # optax's clip and decay mix int and float
def test_non_float_leaves_are_never_moved():
  """An int leaf with weight decay and clipping: fused and plain steps leave
  it as it is (0.2's fused step turned [0, 1, 2] into [0, 0, 0])."""
  params = {"w": jnp.array([1.0, -2.0]), "step": jnp.array([0, 1, 2])}
  loss = lambda p: jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
  tx = aho.adahessian(0.1, weight_decay=0.5, key=0, clip_threshold=1.0)

  @jax.jit
  def plain(p, s):
    g = jax.grad(loss, allow_int=True)(p)  # float0 for the int leaf
    u, s = tx.update(g, s, p, value_fn=loss)
    return optax.apply_updates(p, u), s, u

  @jax.jit
  def fused(p, s):
    _, g, h = aho.value_grad_and_hessian(loss, p, s)
    u, s = tx.update(g, s, p, hessian=h)
    return optax.apply_updates(p, u), s, u

  a = b = params
  sa = sb = tx.init(params)
  for _ in range(3):
    a, sa, ua = plain(a, sa)
    b, sb, ub = fused(b, sb)
    np.testing.assert_array_equal(ua["step"], 0)
    np.testing.assert_array_equal(ub["step"], 0)
  np.testing.assert_array_equal(a["step"], [0, 1, 2])
  assert a["step"].dtype == params["step"].dtype == b["step"].dtype
  np.testing.assert_array_equal(b["step"], [0, 1, 2])
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
  # Weight decay still reaches the float leaf: with it, w shrinks more.
  no_decay = aho.adahessian(0.1, key=0, clip_threshold=1.0)
  u0, _ = no_decay.update(jax.grad(loss, allow_int=True)(params),
                          no_decay.init(params), params, value_fn=loss)
  _, _, u1 = plain(params, tx.init(params))
  np.testing.assert_allclose(u1["w"] - u0["w"], -0.1 * 0.5 * params["w"],
                             rtol=1e-6)
