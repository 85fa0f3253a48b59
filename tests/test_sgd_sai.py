"""SGD-SaI (benchmarks/study/sgd_sai.py) against a NumPy re-implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.study import sgd_sai


def _numpy_sgd_sai(params, grads, lr, momentum, wd, eps, normalize):
  """The authors' loop (per tensor), optionally normalised as in the paper."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  gsnr = {k: np.linalg.norm(g) / (np.std(g, ddof=1) + eps)
          for k, g in grads[0].items()}
  if normalize:
    top = max(gsnr.values())
    gsnr = {k: s / top for k, s in gsnr.items()}
  buf = {}
  for g in grads:
    for k in params:
      buf[k] = g[k] if k not in buf else momentum * buf[k] + (1 - momentum) * g[k]
      params[k] = params[k] * (1 - wd * lr) - lr * gsnr[k] * buf[k]
  return params


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_numpy(normalize):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=(3,)) * 0.1}
  grads = [{k: rng.normal(size=v.shape) * (1 + i) for k, v in params.items()}
           for i in range(4)]
  expected = _numpy_sgd_sai(params, grads, 0.1, 0.9, 1e-2, 1e-8, normalize)
  tx = sgd_sai.sgd_sai(0.1, normalize=normalize)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  step = jax.jit(tx.update)
  for g in grads:
    updates, state = step(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  for k in params:
    np.testing.assert_allclose(p[k], expected[k], rtol=1e-5, atol=1e-6)


def test_scale_is_fixed_at_the_first_step():
  tx = sgd_sai.scale_by_sai(normalize=False)
  params = {"a": jnp.zeros(4), "b": jnp.zeros(())}
  state = tx.init(params)
  first = {"a": jnp.array([1.0, 2.0, 3.0, 4.0]), "b": jnp.array(5.0)}
  _, state = tx.update(first, state)
  snr = np.linalg.norm([1, 2, 3, 4]) / np.std([1, 2, 3, 4], ddof=1)
  np.testing.assert_allclose(state.gsnr["a"], snr, rtol=1e-6)
  assert float(state.gsnr["b"]) == 1.0   # one element: no spread, scale 1
  _, state = tx.update({"a": jnp.ones(4), "b": jnp.array(1.0)}, state)
  np.testing.assert_allclose(state.gsnr["a"], snr, rtol=1e-6)
  assert int(state.count) == 2


def test_normalized_scales_are_at_most_one():
  tx = sgd_sai.scale_by_sai()
  params = {"a": jnp.zeros(8), "b": jnp.zeros(8)}
  g = {"a": jnp.arange(8.0) + 10.0, "b": jnp.arange(8.0) - 3.5}
  _, state = tx.update(g, tx.init(params))
  scales = sorted(float(s) for s in jax.tree.leaves(state.gsnr))
  assert scales[-1] == pytest.approx(1.0) and 0.0 < scales[0] < 1.0
