"""Flax integration: the NNX loss closure and the Linen TrainState."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adahessian_optax as aho

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax.training import train_state  # noqa: E402

RATE = 0.5


def _data(n=32, d=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, classes))
  y = np.argmax(x @ w, axis=-1).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


class _BnDropMlp(nnx.Module):
  """Linear -> BatchNorm -> relu -> Dropout -> Linear."""

  def __init__(self, rngs, d=6, hidden=8, classes=3):
    self.lin1 = nnx.Linear(d, hidden, rngs=rngs)
    self.bn = nnx.BatchNorm(hidden, rngs=rngs)
    self.drop = nnx.Dropout(RATE, rngs=rngs)
    self.lin2 = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x):
    return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))


def _xent(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _pure_params(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


def _comparable(tree):
  """Typed PRNG keys as their raw data, so that NumPy can compare them."""
  return jax.tree.map(
      lambda v: (jax.random.key_data(v)
                 if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v), tree)


def _allclose(a, b, **kw):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **kw), a, b)


# ----------------------------------------------------------------- NNX closure


def test_nnx_closure_is_the_loss_and_its_hessian_pass_changes_no_state():
  model = _BnDropMlp(nnx.Rngs(1))
  x, y = _data(seed=1)
  optimizer = nnx.Optimizer(model, aho.adahessian(0.1, key=0), wrt=nnx.Param)
  others = lambda m: _comparable(nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param))))

  @nnx.jit
  def step(model, optimizer, x, y):
    value_fn = aho.nnx_value_fn(_xent, model, x, y)
    params = _pure_params(model)
    loss, grads = nnx.value_and_grad(_xent)(model, x, y)
    after_grad = others(model)
    checks = (loss, nnx.as_pure(grads), value_fn(params),
              jax.grad(value_fn)(params), value_fn(params))
    optimizer.update(model, grads, value_fn=value_fn)
    return after_grad, checks

  before = others(model)
  after_grad, checks = step(model, optimizer, x, y)
  after_update = others(model)
  loss, grads, value, closure_grads, value_again = checks
  # Same value and same gradient: same dropout mask, same batch statistics;
  # and the closure restarts from its snapshot on every call.
  np.testing.assert_allclose(value, loss, rtol=1e-6)
  _allclose(closure_grads, grads, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(value_again, loss, rtol=1e-6)
  # The gradient pass did move the running mean and the RNG count ...
  assert not np.allclose(before["bn"]["mean"], after_grad["bn"]["mean"])
  assert int(after_grad["drop"]["rngs"]["count"]) == int(
      before["drop"]["rngs"]["count"]) + 1
  # ... the Hessian pass moved nothing.
  _allclose(after_update, after_grad, rtol=0, atol=0)
  assert int(optimizer.opt_state[0].hessian_count) == 1
  # Control: with the stream advanced, the model's next loss differs.
  assert abs(float(_xent(model, x, y)) - float(loss)) > 1e-4


class _LinearDrop(nnx.Module):
  """Loss tanh(drop(x) @ W) with a non-diagonal Hessian in W."""

  def __init__(self, seed, d=5, k=3):
    self.w = nnx.Param(jax.random.normal(jax.random.key(7), (d, k)))
    # seed None: the stream is passed at call time instead.
    self.drop = nnx.Dropout(
        RATE, rngs=None if seed is None else nnx.Rngs(dropout=seed))

  def __call__(self, x, rngs=None):
    return jnp.tanh(self.drop(x, rngs=rngs) @ self.w[...])


def _linear_drop_loss(model, x, rngs=None):
  return jnp.mean(jnp.sin(3.0 * model(x, rngs=rngs)))


def _reference(mask, x):
  """The same loss with an explicit dropout mask, as a function of params."""
  def loss(p):
    return jnp.mean(jnp.sin(3.0 * jnp.tanh((x * mask / (1 - RATE)) @ p["w"])))
  return loss


def _first_mask(seed, shape, rngs_at_call):
  """The first mask a fresh Dropout draws from nnx.Rngs(dropout=seed)."""
  if rngs_at_call:
    out = nnx.Dropout(RATE)(jnp.ones(shape), rngs=nnx.Rngs(dropout=seed))
  else:
    out = nnx.Dropout(RATE, rngs=nnx.Rngs(dropout=seed))(jnp.ones(shape))
  return (out != 0).astype(jnp.float32)


@pytest.mark.parametrize("rngs_at_call", [False, True])
def test_nnx_dropout_mask_of_grad_and_hvp_is_the_same(rngs_at_call):
  seed = 11
  x = jax.random.normal(jax.random.key(3), (8, 5))
  mask = _first_mask(seed, x.shape, rngs_at_call)
  assert 0 < float(mask.mean()) < 1
  ref = _reference(mask, x)

  model = _LinearDrop(None if rngs_at_call else seed)
  args = (x, nnx.Rngs(dropout=seed)) if rngs_at_call else (x,)
  params = _pure_params(model)
  tangent = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(5), p.shape), params)

  @nnx.jit
  def run(model, args):
    value_fn = aho.nnx_value_fn(_linear_drop_loss, model, *args)
    _, grads = nnx.value_and_grad(_linear_drop_loss)(model, *args)
    hvp = jax.jvp(jax.grad(value_fn), (params,), (tangent,))[1]
    diag = aho.hutchinson_diagonal(value_fn, params, key=4).diagonal
    # Control: a closure built after the gradient pass sees the next mask.
    late = aho.nnx_value_fn(_linear_drop_loss, model, *args)
    hvp_late = jax.jvp(jax.grad(late), (params,), (tangent,))[1]
    return nnx.as_pure(grads), hvp, diag, hvp_late

  grads, hvp, diag, hvp_late = run(model, args)
  # The gradient pass (which advanced the stream) used the mask of the key,
  _allclose(grads, jax.grad(ref)(params), rtol=1e-5, atol=1e-7)
  # and so does the Hessian-vector product of the closure.
  # (A wrong mask moves entries by O(1); 1e-4 leaves room for two float32
  # programs that sum in different orders.)
  _, hvp_ref = jax.jvp(jax.grad(ref), (params,), (tangent,))
  _allclose(hvp, hvp_ref, rtol=1e-4, atol=1e-6)
  diag_ref = aho.hutchinson_diagonal(ref, params, key=4).diagonal
  _allclose(diag, diag_ref, rtol=1e-4, atol=1e-6)
  assert not np.allclose(hvp_late["w"], hvp_ref["w"], atol=1e-4)


def test_nnx_value_fn_has_aux_and_errors():
  model = _BnDropMlp(nnx.Rngs(0))
  x, y = _data()

  def with_aux(m, x, y):
    return _xent(m, x, y), {"n": x.shape[0]}

  params = _pure_params(model)

  @nnx.jit
  def run(model, x, y):
    aux_fn = aho.nnx_value_fn(with_aux, model, x, y, has_aux=True)
    plain_fn = aho.nnx_value_fn(_xent, model, x, y)
    (loss, _), _ = nnx.value_and_grad(with_aux, has_aux=True)(model, x, y)
    # Variables (not only arrays) are accepted, as from nnx.state.
    return loss, aux_fn(params), plain_fn(nnx.state(model, nnx.Param))

  loss, aux_value, plain_value = run(model, x, y)
  np.testing.assert_allclose(aux_value, loss, rtol=1e-6)
  np.testing.assert_allclose(plain_value, loss, rtol=1e-6)

  value_fn = aho.nnx_value_fn(_xent, model, x, y)
  with pytest.raises(ValueError, match="wrt"):
    value_fn({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="selects no variable"):
    aho.nnx_value_fn(_xent, model, x, y, wrt=nnx.Intermediate)
  with pytest.raises(TypeError, match="NNX Module"):
    aho.nnx_value_fn(_xent, {"w": jnp.ones(3)}, x, y)
  with pytest.raises(TypeError, match="argument order"):
    aho.nnx_value_fn(model, _xent, x, y)
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    aho.nnx_value_fn("loss", model, x, y)
  with pytest.raises(TypeError, match=r"\(loss, aux\)"):
    aho.nnx_value_fn(_xent, model, x, y, has_aux=True)(params)
  with pytest.raises(TypeError, match="has_aux"):
    aho.nnx_value_fn(_xent, model, x, y, has_aux=1)


def _eval_loss(model, x, y):
  model.eval()
  loss = float(_xent(model, x, y))
  model.train()
  return loss


@pytest.mark.slow  # a training run
@pytest.mark.standard_promotion
def test_nnx_jitted_training_reduces_loss_with_static_refresh():
  model = _BnDropMlp(nnx.Rngs(2), hidden=16)
  x, y = _data(n=64, seed=2)
  def kernel_blocks(params):  # sees Variable leaves at init, arrays later
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (aho.block_mean(2) if "kernel" in
                         [getattr(k, "key", None) for k in path] else None),
        params)

  tx = optax.chain(
      optax.clip_by_global_norm(10.0),
      aho.adahessian(0.1, key=0, update_interval=None,
                     spatial_averaging=kernel_blocks))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @functools.partial(nnx.jit, static_argnames="refresh")
  def train_step(model, optimizer, x, y, refresh):
    value_fn = aho.nnx_value_fn(_xent, model, x, y)
    loss, grads = nnx.value_and_grad(_xent)(model, x, y)
    optimizer.update(model, grads, value_fn=value_fn, hessian_refresh=refresh)
    return loss

  start = _eval_loss(model, x, y)
  for step in range(40):
    loss = train_step(model, optimizer, x, y, refresh=step % 2 == 0)
    assert np.isfinite(loss)
  adahessian_state = optimizer.opt_state[1][0]
  assert int(adahessian_state.count) == 40
  assert int(adahessian_state.hessian_count) == 20
  # The rules function was applied: kernels' nu is constant on blocks of 2.
  nu = nnx.as_pure(adahessian_state.nu)
  kernel, bias = np.asarray(nu["lin1"]["kernel"]), np.asarray(nu["lin1"]["bias"])
  np.testing.assert_array_equal(kernel[:, 0::2], kernel[:, 1::2])
  assert not np.allclose(bias[0::2], bias[1::2], rtol=1e-3, atol=0)
  assert _eval_loss(model, x, y) < 0.5 * start


# ---------------------------------------------------------------- Linen


class _LinenBnDrop(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    x = nn.Dropout(RATE, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


class _State(aho.TrainState):
  batch_stats: dict


def _linen_setup(tx, seed=0):
  model = _LinenBnDrop()
  x, y = _data(n=64, seed=seed)
  variables = model.init(jax.random.key(seed), x, train=False)
  state = _State.create(apply_fn=model.apply, params=variables["params"],
                        batch_stats=variables["batch_stats"], tx=tx)
  return state, x, y


def _linen_loss(params, batch_stats, apply_fn, x, y, key):
  logits, updates = apply_fn(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      rngs={"dropout": key}, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates["batch_stats"]


def _linen_step(state, x, y, key, refresh=None):
  loss_fn = functools.partial(_linen_loss, batch_stats=state.batch_stats,
                              apply_fn=state.apply_fn, x=x, y=y, key=key)
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(
      grads=grads, batch_stats=batch_stats,
      value_fn=lambda p: loss_fn(p)[0], hessian_refresh=refresh)
  return state, loss, batch_stats


def test_linen_train_state_matches_manual_update():
  tx = aho.adahessian(0.1, key=3)
  state, x, y = _linen_setup(tx)
  key = jax.random.key(9)

  @jax.jit
  def run(state):
    new, _, batch_stats = _linen_step(state, x, y, key)
    value_fn = lambda p: _linen_loss(p, state.batch_stats, state.apply_fn, x,
                                     y, key)[0]
    grads = jax.grad(value_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   value_fn=value_fn)
    return new, batch_stats, optax.apply_updates(state.params, updates), opt_state

  new, batch_stats, params, opt_state = run(state)
  _allclose(new.params, params, rtol=1e-6, atol=1e-7)
  _allclose(new.opt_state, opt_state, rtol=1e-6, atol=1e-7)
  assert int(new.step) == 1
  assert new.tx is tx
  assert int(new.opt_state[0].hessian_count) == 1
  # batch_stats replaced as in flax's apply_gradients: the grad pass's values.
  _allclose(new.batch_stats, batch_stats, rtol=0, atol=0)
  assert not np.allclose(jax.tree.leaves(new.batch_stats)[0],
                         jax.tree.leaves(state.batch_stats)[0])


@pytest.mark.standard_promotion
def test_linen_train_state_without_extra_args_is_flax():
  tx = optax.adam(1e-2)
  state, x, y = _linen_setup(tx)
  key = jax.random.key(0)

  @jax.jit
  def run(state):
    loss_fn = functools.partial(_linen_loss, batch_stats=state.batch_stats,
                                apply_fn=state.apply_fn, x=x, y=y, key=key)
    (_, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ours = state.apply_gradients(grads=grads, batch_stats=bs)
    theirs = train_state.TrainState.apply_gradients(
        state, grads=grads, batch_stats=bs)
    return ours, theirs, grads

  ours, theirs, grads = run(state)
  _allclose(ours.params, theirs.params, rtol=0, atol=0)
  _allclose(ours.batch_stats, theirs.batch_stats, rtol=0, atol=0)
  assert not np.allclose(jax.tree.leaves(ours.params)[0],
                         jax.tree.leaves(state.params)[0])
  assert int(ours.step) == int(theirs.step) == 1
  with pytest.raises(TypeError, match="plain GradientTransformation"):
    state.replace(tx=optax.GradientTransformation(tx.init, tx.update)
                  ).apply_gradients(grads=grads, value_fn=lambda p: 0.0)
  with pytest.raises(ValueError, match="both directly and in tx_kwargs"):
    state.apply_gradients(grads=grads, value_fn=lambda p: 0.0,
                          tx_kwargs={"value_fn": lambda p: 0.0})


@pytest.mark.slow  # a training run
def test_linen_jitted_training_reduces_loss_with_static_refresh():
  state, x, y = _linen_setup(aho.adahessian(0.1, key=1, update_interval=None),
                             seed=4)
  step_fn = jax.jit(_linen_step, static_argnames="refresh")

  def eval_loss(state):
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, x,
        train=False)
    return float(optax.softmax_cross_entropy_with_integer_labels(
        logits, y).mean())

  start = eval_loss(state)
  for step in range(30):
    state, loss, _ = step_fn(state, x, y, jax.random.key(step),
                             refresh=step % 3 == 0)
    assert np.isfinite(loss)
  assert int(state.opt_state[0].hessian_count) == 10
  assert int(state.step) == 30
  assert eval_loss(state) < 0.5 * start


def test_import_without_flax(run_script):
  code = (
      "import sys; sys.modules['flax'] = None\n"
      "import adahessian_optax as aho\n"
      # One step on sum(w^2): H = 2I, so every probe's estimate is 2 and
      # the first update is -lr * 2w / (2 + eps) whatever the probe.
      "import jax, jax.numpy as jnp, numpy as np\n"
      "w = jnp.array([1.0, -2.0])\n"
      "loss = lambda p: jnp.sum(p ** 2)\n"
      "tx, g = aho.adahessian(0.1, key=0), jax.grad(loss)(w)\n"
      "updates, _ = tx.update(g, tx.init(w), w, value_fn=loss)\n"
      "np.testing.assert_allclose(updates, -0.1 * w / (1 + 5e-5), rtol=1e-6)\n"
      "try:\n"
      "  aho.TrainState\n"
      "except ImportError as e:\n"
      "  assert 'needs flax' in str(e), e\n"
      "else:\n"
      "  raise AssertionError('no ImportError')\n"
      "names = {}\n"
      "exec('from adahessian_optax import *', names)\n"
      "assert 'spatial_rules' in names and 'adahessian' in names\n"
      "assert 'TrainState' not in names and 'TrainState' not in aho.__all__\n"
      "assert 'flax' not in [m.split('.')[0] for m in sys.modules"
      " if sys.modules[m] is not None]\n")
  run_script("-c", code, timeout=120)


@pytest.mark.slow  # four compiled NNX and Linen programs; the fused and
# plain steps' equality itself is in test_adahessian's fast set
def test_fused_step_in_nnx_and_linen_matches_the_plain_step():
  # NNX: the closure over the model's state, fused and plain, on a model
  # without mutable state (so both steps see the same function).
  def run(fused):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x, y = jnp.ones((8, 4)) * jnp.arange(4.0), jnp.arange(8) % 3
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
        m(x), y).mean()
    optimizer = nnx.Optimizer(model, aho.adahessian(0.1, key=1),
                              wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      value_fn = aho.nnx_value_fn(loss_fn, model)
      if fused:
        params = nnx.state(model, nnx.Param)
        _, grads, hessian = aho.value_grad_and_hessian(
            value_fn, params, optimizer.opt_state)
        optimizer.update(model, grads, hessian=hessian)
      else:
        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads, value_fn=value_fn)

    for _ in range(3):
      step(model, optimizer)
    return nnx.state(model, nnx.Param), loss_fn(model)

  (fused_params, fused_loss), (plain_params, plain_loss) = run(True), run(False)
  _allclose(fused_params, plain_params, rtol=1e-5, atol=1e-6)
  assert float(fused_loss) == pytest.approx(float(plain_loss), rel=1e-5)
  init = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Param)
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(fused_params), jax.tree.leaves(init))]
  assert max(moved) > 0.05

  # Linen: aho.TrainState forwards hessian= like value_fn.
  tx = aho.adahessian(0.1, key=3)
  model = nn.Dense(2)
  x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
  state = aho.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"],
      tx=tx)
  loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
  _, grads, hessian = aho.value_grad_and_hessian(loss, state.params,
                                                 state.opt_state)
  fused = state.apply_gradients(grads=grads, hessian=hessian)
  plain = state.apply_gradients(grads=jax.grad(loss)(state.params),
                                value_fn=loss)
  _allclose(fused.params, plain.params, rtol=1e-6, atol=1e-7)
  _allclose(fused.opt_state, plain.opt_state, rtol=1e-6, atol=1e-7)
  assert int(fused.opt_state[0].hessian_count) == 1
