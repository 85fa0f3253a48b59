"""Saving the optimizer state mid-run and resuming it bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import adahessian_optax as aho

_TOTAL, _SAVED_AT = 7, 4


def _problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(11), 4)
  params = {
      "conv": jax.random.normal(k1, (3, 3, 2, 4)) * 0.3,
      "dense": {"w": jax.random.normal(k2, (4, 3)) * 0.5, "b": jnp.zeros(3)},
  }
  # 3x3 image patches: the kernel acts as a convolution at one position
  # (and gets the default window averaging), at a fraction of the compile
  # time of lax.conv inside the run-time refresh cond.
  x = jax.random.normal(k3, (16, 3, 3, 2))
  y = jax.random.normal(k4, (16, 3))

  def loss(p):
    h = jnp.tanh(jnp.einsum("nijc,ijcd->nd", x, p["conv"]))
    return jnp.mean((h @ p["dense"]["w"] + p["dense"]["b"] - y) ** 2)

  return params, loss


def _optimizers():
  return {
      # Schedule and weight decay (their counts are state too), a refresh
      # every 3 steps decided at run time, and 2 probes per refresh.
      "adahessian": aho.adahessian(
          optax.cosine_decay_schedule(0.1, 20), key=3, weight_decay=1e-3,
          update_interval=3, n_samples=2),
      # Hyperparameters in the state, the step a traced update_interval.
      # The key is an int seed: a typed key would be stored among the
      # hyperparameters, which msgpack cannot serialise.
      "inject_hyperparams": optax.inject_hyperparams(
          aho.adahessian, static_args=("n_samples",))(
              learning_rate=0.1, key=5, update_interval=2),
      # Saved mid-accumulation (after micro-step 4 of groups of 3).
      "multi_steps": optax.MultiSteps(aho.adahessian(0.1, key=2), 3),
  }


# optax's schedules and MultiSteps are not clean under strict dtype
# promotion.
_NAMES = [pytest.param("adahessian", marks=pytest.mark.standard_promotion),
          "inject_hyperparams",
          pytest.param("multi_steps", marks=pytest.mark.standard_promotion)]


@functools.lru_cache(maxsize=None)
def _runner(name):
  """The optimizer, the initial params and a run function (compiled once)."""
  tx = _optimizers()[name]
  params, loss = _problem()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss)
    return optax.apply_updates(params, updates), state

  def run(params, state, n):
    for _ in range(n):
      params, state = step(params, state)
    return params, state

  return tx, params, run


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", _NAMES)
def test_msgpack_round_trip_resumes_bit_identically(name):
  tx, params0, run = _runner(name)
  want = run(params0, tx.init(params0), _TOTAL)

  saved = run(params0, tx.init(params0), _SAVED_AT)
  data = serialization.to_bytes(saved)
  # Restore into a fresh template, as a new process would.
  template = (params0, tx.init(params0))
  restored = serialization.from_bytes(template, data)
  _assert_identical(restored, saved)
  got = run(*restored, _TOTAL - _SAVED_AT)
  _assert_identical(got, want)


@pytest.mark.parametrize("name", _NAMES)
def test_orbax_round_trip_resumes_bit_identically(name, tmp_path):
  tx, params0, run = _runner(name)
  want = run(params0, tx.init(params0), _TOTAL)

  params, state = run(params0, tx.init(params0), _SAVED_AT)
  # A typed PRNG key elsewhere in the train state round-trips too.
  train_state = {"params": params, "opt_state": state,
                 "data_key": jax.random.key(42), "step": jnp.int32(_SAVED_AT)}
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  checkpointer.save(path, train_state)
  checkpointer.wait_until_finished()

  template = {"params": params0, "opt_state": tx.init(params0),
              "data_key": jax.random.key(0), "step": jnp.int32(0)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = checkpointer.restore(path, abstract)
  checkpointer.close()

  assert jax.dtypes.issubdtype(restored["data_key"].dtype,
                               jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["data_key"]),
                                jax.random.key_data(jax.random.key(42)))
  restored.pop("data_key")
  train_state.pop("data_key")
  _assert_identical(restored, train_state)
  got = run(restored["params"], restored["opt_state"], _TOTAL - _SAVED_AT)
  _assert_identical(got, want)


def test_state_key_is_raw_uint32_data():
  # Raw key data (not a typed key) is what lets msgpack serialise the state.
  params, _ = _problem()
  for key in (3, jax.random.key(3), jax.random.PRNGKey(3)):
    state = aho.scale_by_adahessian(key=key).init(params).estimator
    assert state.key.dtype == jnp.uint32
    np.testing.assert_array_equal(state.key,
                                  jax.random.key_data(jax.random.key(3)))
  with pytest.raises(TypeError):
    serialization.to_bytes({"key": jax.random.key(3)})
  # A non-default PRNG implementation is kept through the raw data too.
  tx = aho.scale_by_adahessian(key=jax.random.key(3, impl="rbg"))
  state = tx.init(params)
  assert state.estimator.key.shape == jax.random.key_data(
      jax.random.key(3, impl="rbg")).shape
  restored = serialization.from_bytes(tx.init(params),
                                      serialization.to_bytes(state))
  _assert_identical(restored, state)


@pytest.mark.parametrize("use_orbax", [False, True], ids=["msgpack", "orbax"])
def test_resume_with_static_refresh_pattern(use_orbax, tmp_path):
  # The documented fast pattern: hessian_refresh static, decided from a step
  # counter that is itself checkpointed.
  params0, loss = _problem()
  tx = aho.adahessian(0.1, key=0, update_interval=None)

  @functools.partial(jax.jit, static_argnames="refresh")
  def step(params, state, refresh):
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=loss, hessian_refresh=refresh)
    return optax.apply_updates(params, updates), state

  def run(params, state, start, stop):
    for i in range(start, stop):
      params, state = step(params, state, refresh=(i % 3 == 0))
    return params, state

  want = run(params0, tx.init(params0), 0, _TOTAL)
  saved = {"params": None, "state": None, "step": jnp.int32(_SAVED_AT)}
  saved["params"], saved["state"] = run(params0, tx.init(params0), 0,
                                        _SAVED_AT)
  template = {"params": params0, "state": tx.init(params0),
              "step": jnp.int32(0)}
  if use_orbax:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp_path / "c", saved)
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(
          tmp_path / "c",
          jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  else:
    restored = serialization.from_bytes(template,
                                        serialization.to_bytes(saved))
  assert int(restored["state"][0].hessian_count) == 2  # steps 0 and 3
  got = run(restored["params"], restored["state"], int(restored["step"]),
            _TOTAL)
  _assert_identical(got, want)


def _checkpoint_0_5_problem():
  """The problem tests/data/make_checkpoint_0_5.py trained with 0.5.2."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(11), 4)
  params = {"w1": jax.random.normal(k1, (4, 6)) * 0.5, "b1": jnp.zeros(6),
            "w2": jax.random.normal(k2, (6, 3)) * 0.5}
  x = jax.random.normal(k3, (16, 4))
  y = jax.random.randint(k4, (16,), 0, 3)
  loss = aho.ggn(lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"],
                 aho.SoftmaxCrossEntropy(y))
  return params, loss


@pytest.mark.parametrize("name", ["hutchinson", "gnb"])
@pytest.mark.parametrize("use_orbax", [False, True], ids=["msgpack", "orbax"])
def test_0_5_checkpoints_load_and_resume_as_0_5_did(name, use_orbax):
  # Saved by 0.5.2 (HutchinsonState / GNBState) after 4 steps, with the
  # params 0.5.2 reached 3 steps later: the 0.6 state (EstimatorState) loads
  # them and continues on the same probes and labels.
  import json, os  # pylint: disable=import-outside-toplevel
  folder = os.path.join(os.path.dirname(__file__), "data", "checkpoint_0_5")
  params0, loss = _checkpoint_0_5_problem()
  tx = {"hutchinson": aho.adahessian(0.1, key=3, weight_decay=1e-3,
                                     update_interval=3, n_samples=2),
        "gnb": aho.adahessian(0.05, estimator=aho.gnb_estimator(
            key=4, n_samples=2))}[name]
  template = {"params": params0, "opt_state": tx.init(params0)}
  if use_orbax:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(
          os.path.abspath(os.path.join(folder, f"{name}_orbax")),
          jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  else:
    with open(os.path.join(folder, f"{name}.msgpack"), "rb") as f:
      restored = serialization.from_bytes(template, f.read())
  assert int(restored["opt_state"][0].count) == 4

  # 0.5's Hutchinson estimator took the Hessian of any callable; since 0.6
  # it takes the curvature of the loss's kind (a GGN's for aho.ggn), so the
  # Hessian is asked for with the plain closure.
  value_fn = loss if name == "gnb" else (lambda p: loss(p))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params,
                               value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  params, state = restored["params"], restored["opt_state"]
  for _ in range(3):
    params, state = step(params, state)
  with open(os.path.join(folder, "after_7_steps.json"), encoding="utf-8") as f:
    want = json.load(f)[name]
  for k in params:
    # 0.5.2 ran with XLA's default flags, the suite with its own: the same
    # arithmetic up to summation order.
    np.testing.assert_allclose(params[k], np.asarray(want[k]), rtol=2e-5,
                               atol=1e-6)
