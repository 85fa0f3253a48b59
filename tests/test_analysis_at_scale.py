"""The analysis of examples/gpt.py's model with params sharded FSDP-style
over the suite's simulated devices equals the one-device analysis."""

import functools

import jax
import numpy as np
import pytest

import adahessian_optax as aho

gpt = pytest.importorskip("examples.gpt")


@pytest.mark.slow
def test_sharded_gpt_hessian_and_ggn_equal_the_one_device_analysis():
  from benchmarks.analysis import at_scale  # pylint: disable=import-outside-toplevel
  cfg = gpt.CONFIGS["tiny"]
  graphdef, params = gpt.build(cfg)
  batch = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
  devices = jax.device_count()
  assert devices >= 4
  mesh = gpt.make_mesh(devices)
  sharded = (jax.device_put(params, gpt.shardings(params, mesh)),
             jax.device_put(batch, gpt.batch_sharding(mesh)))
  assert any(len(x.sharding.device_set) == devices
             and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(sharded[0]))
  one = (jax.device_put(params, jax.devices()[0]),
         jax.device_put(batch, jax.devices()[0]))
  for curvature, loss in at_scale._losses(graphdef).items():  # pylint: disable=protected-access
    results = []
    for p, b in (one, sharded):
      op = aho.curvature_operator(loss, p, batch=b)
      top = aho.eigenpairs(op, 0, k=2, tol=1e-5, n_steps=40)
      trace = aho.trace(op, 1, n_samples=6)
      results.append((np.asarray(top.values), np.asarray(trace.samples)))
      assert bool(top.info.converged), curvature
    (v1, t1), (v2, t2) = results
    np.testing.assert_allclose(v2, v1, rtol=1e-4, err_msg=curvature)
    np.testing.assert_allclose(t2, t1, rtol=1e-4, err_msg=curvature)
    # Under jit with the sharded params too.
    jitted = jax.jit(functools.partial(
        lambda p, b, loss: aho.eigenpairs(
            aho.curvature_operator(loss, p, batch=b), 0, k=2, tol=1e-5,
            n_steps=40).values, loss=loss))(*sharded)
    np.testing.assert_allclose(jitted, v1, rtol=1e-4, err_msg=curvature)
