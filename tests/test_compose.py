"""AdaHessian inside optax.masked, optax.partition, MultiSteps and
inject_hyperparams."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adahessian_optax as aho

_A = jnp.array([1.0, 4.0, 9.0])


def _params():
  return {"dense": {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)},
          "emb": jnp.array([[0.5, -1.0], [2.0, 0.1]])}


def _loss(p):
  # Separable in dense/w (diagonal 2 * _A) but coupled to emb through the
  # last term, whose mixed second derivatives w_i, emb_jk are 2 emb_jk.
  w, b, emb = p["dense"]["w"], p["dense"]["b"], p["emb"]
  return (jnp.sum(_A * w ** 2) + 3.0 * b ** 2 + jnp.sum(emb ** 4)
          + jnp.sum(w) * jnp.sum(emb ** 2))


# ------------------------------------------------------------ unmask_params


def test_unmask_params_fills_leaves_and_subtrees():
  full = _params()
  partial = {"dense": {"w": full["dense"]["w"] * 2, "b": optax.MaskedNode()},
             "emb": optax.MaskedNode()}
  out = aho.unmask_params(partial, full)
  assert jax.tree.structure(out) == jax.tree.structure(full)
  np.testing.assert_array_equal(out["dense"]["w"], full["dense"]["w"] * 2)
  np.testing.assert_array_equal(out["dense"]["b"], full["dense"]["b"])
  np.testing.assert_array_equal(out["emb"], full["emb"])
  # A prefix mask replaces a whole subtree by one MaskedNode.
  partial = {"dense": optax.MaskedNode(), "emb": full["emb"] + 1}
  out = aho.unmask_params(partial, full)
  np.testing.assert_array_equal(out["dense"]["w"], full["dense"]["w"])
  np.testing.assert_array_equal(out["emb"], full["emb"] + 1)
  # A complete tree is returned as it is.
  jax.tree.map(np.testing.assert_array_equal,
               aho.unmask_params(full, _params()), full)


def test_unmask_params_rejects_other_trees():
  with pytest.raises(ValueError, match="do not match the full params"):
    aho.unmask_params({"a": optax.MaskedNode()}, _params())
  with pytest.raises(TypeError, match="value_fn must be a callable"):
    aho.masked_value_fn(3.0, _params())


# ------------------------------------------------------ masked and partition

_LABELS = {"dense": {"w": "ah", "b": "ah"}, "emb": "adam"}
_MASK = {"dense": {"w": True, "b": True}, "emb": False}


def _partition():
  return optax.partition(
      {"ah": aho.adahessian(0.2, key=0), "adam": optax.adam(0.05)}, _LABELS)


@pytest.mark.parametrize("wrap", ["masked", "partition"])
@pytest.mark.parametrize("jit", [False, True])
def test_plain_closure_on_masked_params_fails_clearly(wrap, jit):
  tx = (optax.masked(aho.scale_by_adahessian(key=0), _MASK)
        if wrap == "masked" else _partition())
  params = _params()

  def step(params, state):
    return tx.update(jax.grad(_loss)(params), state, params, value_fn=_loss)

  step = jax.jit(step) if jit else step
  with pytest.raises(TypeError, match=r"contain optax.MaskedNode.*"
                     r"masked_value_fn\(loss, params\)"):
    step(params, tx.init(params))


def test_masked_estimate_is_the_owned_block_of_the_diagonal():
  # With emb masked out, only dense gets probes: on this loss one probe is then
  # exact (2 * _A and 6), while probing emb too would add the coupling terms.
  tx = optax.masked(aho.scale_by_adahessian(key=0, b2=0.5), _MASK)
  params = _params()
  grads = jax.grad(_loss)(params)
  _, state = tx.update(grads, tx.init(params), params,
                       value_fn=aho.masked_value_fn(_loss, params))
  nu = state.inner_state.nu
  np.testing.assert_allclose(nu["dense"]["w"], 0.5 * (2 * _A) ** 2, rtol=1e-6)
  np.testing.assert_allclose(nu["dense"]["b"], 0.5 * 6.0 ** 2, rtol=1e-6)
  assert isinstance(nu["emb"], optax.MaskedNode)
  # The check that it matters: probing all leaves gives another estimate.
  full = aho.hutchinson_diagonal(_loss, params, 0).diagonal
  assert not np.allclose(np.abs(full["dense"]["w"]), 2 * _A)


@pytest.mark.standard_promotion  # optax.adam is not strict-clean
def test_partition_adahessian_and_adam_match_separate_runs():
  tx = _partition()
  params = _params()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(_loss)(params), state, params,
                               value_fn=aho.masked_value_fn(_loss, params))
    return optax.apply_updates(params, updates), state

  # Reference: AdaHessian on dense alone (emb held at its current value in
  # the closure) and Adam on emb alone, stepped side by side.
  ah, adam = aho.adahessian(0.2, key=0), optax.adam(0.05)

  @jax.jit
  def ref_step(dense, emb, ah_state, adam_state):
    dense_loss = lambda d: _loss({"dense": d, "emb": emb})
    u, ah_state = ah.update(jax.grad(dense_loss)(dense), ah_state, dense,
                            value_fn=dense_loss)
    emb_grad = jax.grad(lambda e: _loss({"dense": dense, "emb": e}))(emb)
    v, adam_state = adam.update(emb_grad, adam_state, emb)
    return (optax.apply_updates(dense, u), optax.apply_updates(emb, v),
            ah_state, adam_state)

  state = tx.init(params)
  dense, emb = params["dense"], params["emb"]
  ah_state, adam_state = ah.init(dense), adam.init(emb)
  for _ in range(5):
    params, state = step(params, state)
    dense, emb, ah_state, adam_state = ref_step(dense, emb, ah_state,
                                                adam_state)
  for got, want in [(params["dense"], dense), (params["emb"], emb)]:
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
                 got, want)
  assert not np.allclose(params["emb"], _params()["emb"])


# ----------------------------------------------------------------- MultiSteps

_K = 3  # micro-steps per optimizer step


def _micro_batches(n):
  return [jnp.float32(1.0 + 0.25 * i) for i in range(n)]


def _batch_loss(p, scale):
  return scale * jnp.sum(_A * p ** 2) + jnp.sum(p) * scale ** 2


def _counting(fn, calls):
  """`fn` that records, at run time, each execution of its forward pass."""
  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return fn(p)
  return counted


def _multi_steps_run(mode, n_micro, update_interval=1):
  calls = []
  # "static" and "traced" decide each refresh from the MultiSteps state, so
  # the transformation's own schedule is off (update_interval=None).
  ms = optax.MultiSteps(
      aho.adahessian(0.5, key=0, update_interval=(
          update_interval if mode == "default" else None)), _K)

  @functools.partial(jax.jit, static_argnames="refresh")
  def step(params, state, scale, refresh):
    loss = lambda p: _batch_loss(p, scale)
    if mode == "traced":
      # From the MultiSteps state: the last micro-step of an optimizer step
      # whose index is a multiple of update_interval.
      refresh = ((state.mini_step == _K - 1)
                 & (state.gradient_step % update_interval == 0))
    flag = {} if mode == "default" else {"hessian_refresh": refresh}
    updates, state = ms.update(jax.grad(loss)(params), state, params,
                               value_fn=_counting(loss, calls), **flag)
    return optax.apply_updates(params, updates), state

  params = jnp.array([1.0, -2.0, 0.5])
  state = ms.init(params)
  for i, scale in enumerate(_micro_batches(n_micro)):
    refresh = None
    if mode == "static":
      refresh = (i % _K == _K - 1) and ((i // _K) % update_interval == 0)
    params, state = step(params, state, scale, refresh)
  jax.effects_barrier()
  return params, state, len(calls)


def _reference_run(n_micro, update_interval=1):
  """Plain AdaHessian on mean micro-batch gradients, the estimate taken on
  the last micro-batch of each optimizer step."""
  tx = aho.adahessian(0.5, key=0, update_interval=update_interval)
  params = jnp.array([1.0, -2.0, 0.5])
  state = tx.init(params)
  batches = _micro_batches(n_micro)
  for j in range(n_micro // _K):
    group = batches[j * _K:(j + 1) * _K]
    grads = jnp.mean(jnp.stack(
        [jax.grad(_batch_loss)(params, s) for s in group]), axis=0)
    last = functools.partial(_batch_loss, scale=group[-1])
    updates, state = tx.update(grads, state, params, value_fn=last)
    params = optax.apply_updates(params, updates)
  return params, state


# optax.MultiSteps' running mean divides by an int32 count.
@pytest.mark.standard_promotion
@pytest.mark.parametrize("mode,expected_hvps", [
    ("default", 12), ("static", 4), ("traced", 4)])
def test_multi_steps_hessian_products_and_result(mode, expected_hvps):
  # 12 micro-steps = 4 optimizer steps. By default MultiSteps runs the inner
  # update on every micro-step, so the Hessian-vector product runs 12 times
  # (8 of them thrown away); hessian_refresh on the last micro-step only makes
  # it 4, with the same result.
  params, state, hvps = _multi_steps_run(mode, 12)
  assert hvps == expected_hvps
  want_params, want_state = _reference_run(12)
  np.testing.assert_allclose(params, want_params, rtol=1e-6)
  inner = state.inner_opt_state[0]
  assert int(inner.hessian_count) == 4
  np.testing.assert_array_equal(inner.estimator.key,
                                want_state[0].estimator.key)
  np.testing.assert_allclose(inner.nu, want_state[0].nu, rtol=1e-6)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("mode", ["static", "traced"])
def test_multi_steps_with_update_interval(mode):
  # 18 micro-steps = 6 optimizer steps, refreshes on optimizer steps 0, 2, 4.
  params, state, hvps = _multi_steps_run(mode, 18, update_interval=2)
  assert hvps == 3
  want_params, want_state = _reference_run(18, update_interval=2)
  assert int(state.inner_opt_state[0].hessian_count) == 3
  np.testing.assert_allclose(params, want_params, rtol=1e-6)
  np.testing.assert_allclose(state.inner_opt_state[0].nu, want_state[0].nu,
                             rtol=1e-6)


# --------------------------------------------------------- inject_hyperparams


def _inject(**kwargs):
  return optax.inject_hyperparams(aho.adahessian, static_args=("n_samples",))(
      learning_rate=0.1, key=0, **kwargs)


def _set_hyperparam(state, name, value):
  # Same dtype and weak type as before, so that the jitted step is reused.
  state.hyperparams[name] = jax.lax.full_like(state.hyperparams[name], value)


def test_inject_update_interval_changed_mid_run():
  tx = _inject(update_interval=1)
  params = jnp.array([1.0, -2.0, 0.5])
  loss = lambda p: jnp.sum(_A * p ** 2) + jnp.sum(p ** 4)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                        value_fn=loss))
  state = tx.init(params)
  counts, nus = [], []
  for i in range(9):
    if i == 3:
      # From now on refresh when the inner count is a multiple of 4, and
      # halve the learning rate; neither recompiles the step.
      _set_hyperparam(state, "update_interval", 4)
      _set_hyperparam(state, "learning_rate", 0.05)
    updates, new_state = step(params, state)
    if i == 4:
      # The same step at the old learning rate is twice as long.
      _set_hyperparam(state, "learning_rate", 0.1)
      np.testing.assert_allclose(step(params, state)[0], 2 * updates,
                                 rtol=1e-6)
    params, state = optax.apply_updates(params, updates), new_state
    counts.append(int(state.inner_state[0].hessian_count))
    nus.append(np.asarray(state.inner_state[0].nu))
  # Inner counts 0, 1, 2 refresh (interval 1); then 4 and 8 (interval 4).
  assert counts == [1, 2, 3, 3, 4, 4, 4, 4, 5]
  for i in (3, 5, 6, 7):
    np.testing.assert_array_equal(nus[i], nus[i - 1])
  assert not np.array_equal(nus[4], nus[3])
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_inject_static_update_interval_compiles_without_cond():
  params = jnp.array([1.0, -2.0, 0.5])
  loss = lambda p: jnp.sum(_A * p ** 2)

  def jaxpr_text(tx):
    return str(jax.make_jaxpr(
        lambda p, s: tx.update(jax.grad(loss)(p), s, p, value_fn=loss))(
            params, tx.init(params)))

  # Injected, update_interval is an array: the refresh is a run-time cond.
  assert " cond[" in jaxpr_text(_inject(update_interval=1))
  # Static, interval 1 refreshes unconditionally: no cond at all.
  static = optax.inject_hyperparams(
      aho.adahessian, static_args=("n_samples", "update_interval"))(
          learning_rate=0.1, key=0)
  assert " cond[" not in jaxpr_text(static)


def test_inject_messages():
  params = jnp.array([1.0, -2.0])
  loss = lambda p: jnp.sum(p ** 2)
  # n_samples fixes shapes: given, it must be static.
  tx = optax.inject_hyperparams(aho.adahessian)(learning_rate=0.1, key=0,
                                                n_samples=2)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                        value_fn=loss))
  with pytest.raises(TypeError, match=r"static_args=\('n_samples',\)"):
    step(params, tx.init(params))
  # Left at its default (None: one probe), nothing needs to be static.
  tx = optax.inject_hyperparams(aho.adahessian)(learning_rate=0.1, key=0)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p,
                                        value_fn=loss))
  _, state = step(params, tx.init(params))
  assert int(state.inner_state[0].hessian_count) == 1
  # update_interval must stay an integer.
  with pytest.raises(TypeError, match="update_interval must be an integer"):
    _inject(update_interval=2.0).init(params)


# optax.add_decayed_weights multiplies float32 hyperparameters into bfloat16.
@pytest.mark.standard_promotion
def test_inject_low_precision_params():
  # The hyperparameters default to the params' dtype, bfloat16, where
  # b2 = 0.999 rounds to 1: refused with the fix in the message.
  low = jnp.array([1.0, -2.0], jnp.bfloat16)
  with pytest.raises(TypeError, match="hyperparam_dtype=jnp.float32"):
    _inject().init(low)
  tx = optax.inject_hyperparams(aho.adahessian, static_args=("n_samples",),
                                hyperparam_dtype=jnp.float32)(
                                    learning_rate=0.1, key=0)
  loss = lambda p: jnp.sum(p.astype(jnp.float32) ** 2)
  state = tx.init(low)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss)(low), state, low, value_fn=loss)
  # optax's float32 learning rate promotes the final updates to float32;
  # apply_updates casts back to the params' dtype.
  assert optax.apply_updates(low, updates).dtype == jnp.bfloat16
  assert state.inner_state[0].mu.dtype == jnp.bfloat16
  assert state.inner_state[0].nu.dtype == jnp.float32
  # Same gradient twice, exact curvature 2: each update is -lr * g / 2 = -lr p.
  np.testing.assert_allclose(updates.astype(jnp.float32), [-0.1, 0.2],
                             rtol=1e-2)
