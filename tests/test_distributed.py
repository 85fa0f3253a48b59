"""Scale-out: jit with NamedSharding, pmap/shard_map with axis_name, and
jax.distributed with several processes, each against a single-device run."""

import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adahessian_optax as aho
from examples import multihost

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 4  # devices used; conftest gives the test process 4 CPU devices

pytestmark = pytest.mark.skipif(
    jax.device_count() < N,
    reason=f"needs {N} devices (XLA_FLAGS=--xla_force_host_platform_device_count={N})")

# One refresh changes the Hessian EMA by (1 - b2) D^2, which with the default
# b2 = 0.999 is too small to tell a wrong average apart; a small b2 shows it.
B2 = 0.5


# A 1-D convolution (Flax kernel layout (window, in, out), so the default
# conv_window_mean averages its estimate over the window) and a dense layer.
# Two leaves only: on CPU each leaf's probe generator adds seconds of compile.
def _problem(seed=0, n=32):
  rng = np.random.default_rng(seed)
  params = {
      "conv": (rng.normal(size=(4, 2, 8)) / 3).astype(np.float32),
      "w": (rng.normal(size=(8, 4)) / 2).astype(np.float32),
  }
  x = rng.normal(size=(n, 8, 2)).astype(np.float32)
  y = rng.integers(0, 4, n).astype(np.int32)
  return params, x, y


def _loss(params, x, y):
  h = jax.lax.conv_general_dilated(
      x, params["conv"], window_strides=(1,), padding="SAME",
      dimension_numbers=("NWC", "WIO", "NWC"))
  logits = jnp.mean(jnp.tanh(h), axis=1) @ params["w"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _make_step(tx, loss=_loss):
  def step(params, opt_state, x, y):
    loss_of = lambda p: loss(p, x, y)
    grads = jax.grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value_fn=loss_of)
    return optax.apply_updates(params, updates), opt_state
  return step


def _tx(**kw):
  return aho.adahessian(0.05, b2=B2, key=0, **kw)


def _run(step, params, opt_state, x, y, steps=3):
  for _ in range(steps):
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


@pytest.fixture(scope="module")
def reference():
  """Three steps on one device and the full batch: (params, opt_state)."""
  params, x, y = _problem()
  tx = _tx()
  return _run(jax.jit(_make_step(tx)), params, tx.init(params), x, y)


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u, np.float64) -
                                 np.asarray(v, np.float64))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_close(actual, expected, atol):
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual),
                          jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _assert_state_like_params(opt_state, params):
  """mu and nu carry exactly the params' shardings."""
  state = opt_state[0]
  for name in ("mu", "nu"):
    for (path, s), p in zip(
        jax.tree_util.tree_leaves_with_path(getattr(state, name)),
        jax.tree.leaves(params)):
      assert s.sharding.is_equivalent_to(p.sharding, p.ndim), (
          name, jax.tree_util.keystr(path), s.sharding, p.sharding)


def _mesh(name, axis_type):
  return jax.make_mesh((N,), (name,), axis_types=(axis_type,))


# ----------------------------------------------------------------------------
# jax.jit with NamedSharding


def test_data_parallel_jit_matches_single_device(reference):
  ref_params, ref_state = reference
  params, x, y = _problem()
  mesh = _mesh("data", AxisType.Auto)
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  y = jax.device_put(y, NamedSharding(mesh, P("data")))
  tx = _tx()
  with jax.set_mesh(mesh):
    new_params, state = _run(jax.jit(_make_step(tx)), params, tx.init(params),
                             x, y)

  # Batch-sharded vs one device: only the order of float sums differs.
  _assert_close(new_params, ref_params, atol=2e-5)
  _assert_close(state[0].nu, ref_state[0].nu, atol=1e-6)
  _assert_close(state[0].mu, ref_state[0].mu, atol=1e-6)
  assert int(state[0].hessian_count) == 3
  assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(new_params))
  _assert_state_like_params(state, new_params)
  # The run moved the params by far more than the tolerance.
  assert _max_diff(new_params, _problem()[0]) > 0.05


def _fsdp_spec(leaf):
  return P("fsdp") if leaf.shape[0] % N == 0 else P()


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit],
                         ids=["auto", "explicit"])
def test_fsdp_matches_single_device_and_keeps_sharding(axis_type, reference):
  ref_params, ref_state = reference
  params, x, y = _problem()
  mesh = _mesh("fsdp", axis_type)
  shardings = jax.tree.map(lambda a: NamedSharding(mesh, _fsdp_spec(a)),
                           params)
  # Every leaf is sharded; the conv kernel over its window axis, which the
  # spatial averaging reduces over.
  assert all(s.spec == P("fsdp") for s in jax.tree.leaves(shardings))
  params = jax.device_put(params, shardings)
  x = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
  y = jax.device_put(y, NamedSharding(mesh, P("fsdp")))

  loss = _loss
  if axis_type == AxisType.Explicit:
    # With explicit axes the model gathers each weight for its use, as FSDP
    # does; autodiff scatters the gradient back to the sharding.
    loss = lambda p, x, y: _loss(
        jax.tree.map(lambda a: jax.sharding.reshard(a, P()), p), x, y)
  tx = _tx()
  with jax.set_mesh(mesh):
    opt_state = tx.init(params)
    _assert_state_like_params(opt_state, params)
    new_params, state = _run(jax.jit(_make_step(tx, loss)), params,
                             opt_state, x, y)

  _assert_close(new_params, ref_params, atol=2e-5)
  _assert_close(state[0].nu, ref_state[0].nu, atol=1e-6)
  _assert_close(state[0].mu, ref_state[0].mu, atol=1e-6)
  for p, s in zip(jax.tree.leaves(new_params), jax.tree.leaves(shardings)):
    assert p.sharding.is_equivalent_to(s, p.ndim)
  _assert_state_like_params(state, new_params)
  # The per-device buffers of the state are a quarter of the leaves.
  nu_conv = state[0].nu["conv"]
  assert {s.data.shape for s in nu_conv.addressable_shards} == {(1, 2, 8)}


_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16)\[([\d,]*)\]")


def _largest_array(hlo_text):
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in _SHAPE.findall(hlo_text)]
  return max(sizes)


def test_probes_for_sharded_params_are_drawn_shard_locally():
  # A separable loss needs no communication at all, so any gather or
  # full-size buffer in the compiled step would come from the probes.
  mesh = _mesh("fsdp", AxisType.Auto)
  sharding = NamedSharding(mesh, P("fsdp"))
  shape = (96, 40)
  full_size = shape[0] * shape[1]
  w = jax.device_put(np.linspace(-1.0, 1.0, full_size, dtype=np.float32)
                     .reshape(shape), sharding)
  c = jax.device_put(np.linspace(1.0, 2.0, full_size, dtype=np.float32)
                     .reshape(shape), sharding)
  tx = aho.scale_by_adahessian(b2=B2, key=3, spatial_averaging=None)

  def step(w, c, state):
    loss = lambda p: jnp.sum(c * p ** 2 + jnp.sin(p))
    return tx.update(jax.grad(loss)(w), state, w, value_fn=loss)

  state = tx.init(w)
  compiled = jax.jit(step).lower(w, c, state).compile()
  hlo = compiled.as_text()
  assert "all-gather" not in hlo
  assert "all-to-all" not in hlo
  assert _largest_array(hlo) <= full_size // N
  assert _largest_array(hlo) >= full_size // N  # the check does see shards

  updates, new_state = compiled(w, c, state)
  assert new_state.nu.sharding.is_equivalent_to(sharding, 2)
  assert updates.sharding.is_equivalent_to(sharding, 2)
  # The Hessian is diagonal, so every Rademacher z * Hz is exact:
  # nu = (1 - b2) h^2 with h = 2c - sin(w), and u = g / (|h| + eps).
  w, c = np.asarray(w, np.float64), np.asarray(c, np.float64)
  h = 2 * c - np.sin(w)
  g = 2 * c * w + np.cos(w)
  np.testing.assert_allclose(new_state.nu, (1 - B2) * h ** 2, rtol=1e-5)
  np.testing.assert_allclose(updates, g / (np.abs(h) + 1e-4), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit],
                         ids=["auto", "explicit"])
def test_init_accepts_shape_dtype_structs(axis_type):
  mesh = _mesh("fsdp", axis_type)
  sharded = NamedSharding(mesh, P("fsdp"))
  structs = {
      "w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharded),
      "kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.bfloat16),
      "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  real = {"w": jnp.ones((8, 3)), "kernel": jnp.ones((3, 3, 2, 4), jnp.bfloat16),
          "step": jnp.zeros((), jnp.int32)}
  tx = _tx(mu_dtype=jnp.bfloat16)
  expected = tx.init(real)
  # Under jax.eval_shape: the state's shapes, dtypes and the w sharding.
  abstract = jax.eval_shape(tx.init, structs)
  assert jax.tree.structure(abstract) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(abstract), jax.tree.leaves(expected)):
    assert (a.shape, a.dtype) == (e.shape, e.dtype)
  assert abstract[0].nu["kernel"].dtype == jnp.float32
  assert abstract[0].mu["kernel"].dtype == jnp.bfloat16
  if axis_type == AxisType.Explicit:  # only explicit axes live in types
    assert abstract[0].nu["w"].sharding.spec == P("fsdp", None)
  # Directly: concrete zeros, laid out like the structs say.
  state = tx.init(structs)
  for a, e in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert (a.shape, a.dtype) == (e.shape, e.dtype)
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(e, np.float32))
  assert state[0].nu["w"].sharding == sharded
  assert state[0].mu["w"].sharding == sharded


# ----------------------------------------------------------------------------
# pmap and shard_map with axis_name


def _local_step(tx):
  """One data-parallel step on a shard of the batch; value_fn is local."""

  def local_step(params, opt_state, x, y):
    local_loss = lambda p: _loss(p, x, y)
    # Differentiating the axis mean and then taking pmean gives the mean
    # gradient under pmap and under shard_map (whose autodiff psums the
    # gradient of replicated params) alike.
    grads = jax.grad(lambda p: jax.lax.pmean(local_loss(p), "i"))(params)
    grads = jax.lax.pmean(grads, "i")
    updates, opt_state = tx.update(grads, opt_state, params,
                                   value_fn=local_loss)
    return optax.apply_updates(params, updates), opt_state

  return local_step


def _stack(tree):
  # Inside shard_map: each device's own copy becomes one row of the output.
  return jax.tree.map(lambda a: a[None], tree)


def _run_mapped(tx, mapper, steps=3):
  """Trains with the batch split over N replicas; returns every replica."""
  params, x, y = _problem()
  opt_state = tx.init(params)
  if mapper == "pmap":
    step = jax.pmap(_local_step(tx), axis_name="i")
    x, y = x.reshape(N, -1, *x.shape[1:]), y.reshape(N, -1)
    params, opt_state = jax.tree.map(
        lambda a: np.broadcast_to(a, (N,) + np.shape(a)), (params, opt_state))
  else:
    # Params and state enter replicated (in_specs P()), as is usual.
    step = jax.jit(jax.shard_map(
        lambda *args: _stack(_local_step(tx)(*args)),
        mesh=_mesh("i", AxisType.Auto),
        in_specs=(P(), P(), P("i"), P("i")), out_specs=P("i")))
  for _ in range(steps):
    replicas = jax.tree.map(np.asarray, step(params, opt_state, x, y))
    for leaf in jax.tree.leaves(replicas):
      assert leaf.shape[0] == N
      for replica in leaf[1:]:
        np.testing.assert_array_equal(replica, leaf[0])  # bit-identical
    params, opt_state = (replicas if mapper == "pmap" else
                         jax.tree.map(lambda a: a[0], replicas))
  return jax.tree.map(lambda a: a[0], replicas)


@pytest.mark.parametrize("mapper", ["pmap", "shard_map"])
def test_axis_name_keeps_replicas_identical_and_matches_full_batch(
    mapper, reference):
  ref_params, ref_state = reference
  new_params, state = _run_mapped(_tx(axis_name="i"), mapper)
  _assert_close(new_params, ref_params, atol=2e-5)
  _assert_close(state[0].nu, ref_state[0].nu, atol=1e-6)
  _assert_close(state[0].mu, ref_state[0].mu, atol=1e-6)


_HUTCHINSON_KEY = 7


@pytest.fixture(scope="module")
def shard_estimates():
  """Per-shard and full-batch estimates, each on one device."""
  params, x, y = _problem()
  estimate = jax.jit(lambda x, y: aho.hutchinson_diagonal(
      lambda p: _loss(p, x, y), params, _HUTCHINSON_KEY, n_samples=3))
  shards = zip(x.reshape(N, -1, *x.shape[1:]), y.reshape(N, -1))
  return [estimate(*shard) for shard in shards], estimate(x, y)


@pytest.mark.parametrize("mapper", ["pmap", "shard_map"])
def test_hutchinson_axis_name_averages_shard_estimates(mapper, shard_estimates):
  params, x, y = _problem()

  def local(x, y):
    # value_fn is the loss of this device's shard only.
    return aho.hutchinson_diagonal(lambda p: _loss(p, x, y), params,
                                   _HUTCHINSON_KEY, n_samples=3, axis_name="i")

  if mapper == "pmap":
    result = jax.pmap(local, axis_name="i")(x.reshape(N, -1, *x.shape[1:]),
                                            y.reshape(N, -1))
  else:
    result = jax.jit(jax.shard_map(
        lambda x, y: _stack(local(x, y)), mesh=_mesh("i", AxisType.Auto),
        in_specs=P("i"), out_specs=P("i")))(x, y)
  result = jax.tree.map(np.asarray, result)
  for leaf in jax.tree.leaves(result):
    for replica in leaf[1:]:
      np.testing.assert_array_equal(replica, leaf[0])
  result = jax.tree.map(lambda a: a[0], result)

  per_shard, full = shard_estimates
  mean_of_shards = jax.tree.map(lambda *a: np.mean(a, axis=0), *per_shard)
  # The shards really disagree, so matching their mean is informative.
  assert _max_diff(per_shard[0].diagonal, per_shard[1].diagonal) > 1e-2
  for expected in (mean_of_shards, full):
    _assert_close(result.diagonal, expected.diagonal, atol=5e-7)
    _assert_close(result.grad, expected.grad, atol=5e-7)
    np.testing.assert_allclose(result.value, expected.value, rtol=1e-6)


# ----------------------------------------------------------------------------
# Several processes with jax.distributed


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two processes with jax.distributed, each compiling
def test_two_processes_match_single_process(script_env, tmp_path):
  """2 processes x 2 CPU devices train data-parallel on one global batch."""
  steps, timeout = 4, 150.0
  env = dict(script_env, XLA_FLAGS=script_env["XLA_FLAGS"]
             + " --xla_force_host_platform_device_count=2")
  cmd = [sys.executable, str(ROOT / "examples" / "multihost.py"), "--cpu",
         "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
         "--mode", "both", "--steps", str(steps), "--save", str(tmp_path)]
  procs, logs = [], []
  try:
    for i in range(2):
      logs.append(open(tmp_path / f"log_{i}.txt", "w"))
      procs.append(subprocess.Popen(cmd + ["--process-id", str(i)], env=env,
                                    stdout=logs[-1], stderr=subprocess.STDOUT))
    # Meanwhile, the reference: one process, one device, the same batches.
    one_device = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,),
                               devices=jax.devices()[:1])
    ref_params, ref_losses = multihost.train(one_device, steps=steps)
    deadline = time.monotonic() + timeout
    # Stop waiting as soon as one process fails: the other would hang.
    while (any(p.poll() is None for p in procs)
           and not any(p.poll() for p in procs)
           and time.monotonic() < deadline):
      time.sleep(0.05)
    codes = [p.poll() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for log in logs:
      log.close()
  output = "\n".join((tmp_path / f"log_{i}.txt").read_text()[-3000:]
                     for i in range(len(procs)))
  assert codes == [0, 0], f"exit codes {codes}:\n{output}"
  assert "2 processes, 4 devices (2 per process)" in output

  assert _max_diff(ref_params, multihost.init_params()) > 0.05
  for mode in ("jit", "shard_map"):
    results = [dict(np.load(tmp_path / f"{mode}_process_{i}.npz"))
               for i in range(2)]
    for name in results[0]:  # both processes hold the same replicas
      np.testing.assert_array_equal(results[1][name], results[0][name])
    # float32 losses summed in another order across processes: ~1e-5 apart.
    np.testing.assert_allclose(results[0]["losses"], ref_losses, rtol=5e-5)
    for name, ref in ref_params.items():
      # Sums in another order, amplified a little by 1/|D|.
      np.testing.assert_allclose(results[0][name], ref, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{mode}: {name}")
