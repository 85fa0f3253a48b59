"""Spatial averaging rules against values computed by hand in NumPy."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adahessian_optax as aho
from adahessian_optax.optimizer import _spatial


def _np_mean_over_axes(x, axes):
  """Loop over every entry; average the entries that agree off `axes`."""
  axes = {a % x.ndim for a in axes}
  out = np.empty_like(x)
  for idx in itertools.product(*map(range, x.shape)):
    group = [
        x[j] for j in itertools.product(*map(range, x.shape))
        if all(j[d] == idx[d] for d in range(x.ndim) if d not in axes)
    ]
    out[idx] = np.mean(group)
  return out


def _np_block_mean(x, b, axis):
  out = np.empty_like(x)
  y = np.moveaxis(x, axis, -1)
  o = np.moveaxis(out, axis, -1)
  n = y.shape[-1]
  for start in range(0, n, b):
    stop = min(start + b, n)
    o[..., start:stop] = y[..., start:stop].mean(axis=-1, keepdims=True)
  return out


def _leaf(shape, seed=0):
  return np.random.default_rng(seed).uniform(0.1, 5.0, size=shape).astype(
      np.float32)


SHAPES = [(7,), (3, 5), (3, 2, 4), (2, 3, 2, 3), (2, 2, 3, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_mean_over_axes_every_rank(shape):
  x = _leaf(shape)
  for r in range(1, len(shape) + 1):
    for axes in itertools.combinations(range(len(shape)), r):
      got = aho.mean_over_axes(*axes).apply(jnp.asarray(x))
      np.testing.assert_allclose(got, _np_mean_over_axes(x, axes), rtol=1e-6)
  neg = aho.mean_over_axes(-1).apply(jnp.asarray(x))
  np.testing.assert_allclose(neg, _np_mean_over_axes(x, (len(shape) - 1,)),
                             rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [1, 2, 3])
def test_block_mean_every_rank(shape, block):
  x = _leaf(shape, seed=1)
  for axis in range(-len(shape), len(shape)):
    if shape[axis] < block:
      continue
    got = aho.block_mean(block, axis).apply(jnp.asarray(x))
    np.testing.assert_allclose(got, _np_block_mean(x, block, axis), rtol=1e-6)


def test_block_mean_splits_blocks_in_place_without_a_transpose():
  # A transpose of a large kernel's estimate (moving the axis last) cost a
  # param-sized temporary in the refresh step's plan (CHANGELOG 0.6.1); the
  # blocks are split where the axis is.
  x = jnp.asarray(_leaf((3, 8, 5), seed=4))
  for rule in (aho.block_mean(4, axis=1), aho.block_mean(3, axis=1)):
    primitives = {e.primitive.name
                  for e in jax.make_jaxpr(rule.apply)(x).jaxpr.eqns}
    assert "transpose" not in primitives, (rule, primitives)
    np.testing.assert_allclose(rule.apply(x),
                               _np_block_mean(np.asarray(x),
                                              rule.block_size, 1), rtol=1e-6)


def test_block_mean_remainder_forms_its_own_block():
  x = jnp.array([1.0, 3.0, 5.0, 7.0, 9.0, 20.0, 40.0])
  got = aho.block_mean(3).apply(x)
  np.testing.assert_allclose(got, [3, 3, 3, 12, 12, 12, 40])
  whole = aho.block_mean(7).apply(x)
  np.testing.assert_allclose(whole, np.full(7, np.mean(x)), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_conv_window_mean_every_rank(shape):
  x = _leaf(shape, seed=2)
  got = aho.conv_window_mean().apply(jnp.asarray(x))
  want = x if len(shape) < 3 else _np_mean_over_axes(x, range(len(shape) - 2))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_scalar_leaf_untouched_by_default():
  x = jnp.array(2.5)
  assert aho.conv_window_mean().apply(x) == 2.5


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x1, x2, x3):
    a = nn.Conv(4, (3,))(x1)
    b = nn.Conv(4, (3, 3))(x2)
    c = nn.Conv(4, (2, 2, 2))(x3)
    feats = jnp.concatenate([a.mean((1,)), b.mean((1, 2)), c.mean((1, 2, 3))],
                            axis=-1)
    return nn.Dense(3)(nn.LayerNorm()(feats))


def test_conv_window_mean_is_right_for_flax_layouts():
  # 0.2's default, kept as an explicit rule.
  params = _Net().init(jax.random.key(0), jnp.ones((1, 8, 2)),
                       jnp.ones((1, 8, 8, 2)), jnp.ones((1, 4, 4, 4, 2)))
  params = params["params"]
  assert params["Conv_0"]["kernel"].shape == (3, 2, 4)
  assert params["Conv_1"]["kernel"].shape == (3, 3, 2, 4)
  assert params["Conv_2"]["kernel"].shape == (2, 2, 2, 2, 4)
  rules = _spatial.resolve_rules(aho.conv_window_mean(), params)
  averaged = jax.tree.unflatten(
      jax.tree.structure(params),
      [r.apply(x) for r, x in zip(rules, jax.tree.leaves(params))])
  window = {"Conv_0": (0,), "Conv_1": (0, 1), "Conv_2": (0, 1, 2)}
  for name, axes in window.items():
    k = np.asarray(params[name]["kernel"])
    np.testing.assert_allclose(averaged[name]["kernel"],
                               _np_mean_over_axes(k, axes), rtol=1e-5)
    np.testing.assert_array_equal(averaged[name]["bias"], params[name]["bias"])
  np.testing.assert_array_equal(averaged["Dense_0"]["kernel"],
                                params["Dense_0"]["kernel"])
  np.testing.assert_array_equal(averaged["LayerNorm_0"]["scale"],
                                params["LayerNorm_0"]["scale"])


def test_rules_as_prefix_tree_and_function():
  params = {"emb": jnp.ones((6, 4)), "mlp": {"w": jnp.ones((4, 6)),
                                            "b": jnp.ones((6,))}}
  prefix = {"emb": None, "mlp": aho.block_mean(2)}
  got = _spatial.resolve_rules(prefix, params)
  by_path = dict(zip(
      [jax.tree_util.keystr(p) for p, _ in
       jax.tree_util.tree_leaves_with_path(params)], got))
  assert by_path["['emb']"] is None
  assert by_path["['mlp']['w']"] == aho.block_mean(2)
  assert by_path["['mlp']['b']"] == aho.block_mean(2)

  fn = lambda p: jax.tree.map(lambda x: aho.block_mean(3) if x.ndim == 2
                              else None, p)
  got = _spatial.resolve_rules(fn, params)
  assert got == [aho.block_mean(3), None, aho.block_mean(3)]
  assert _spatial.resolve_rules(None, params) == [None, None, None]


def test_rule_errors_name_the_problem():
  params = {"w": jnp.ones((4, 2)), "b": jnp.ones((2,))}
  with pytest.raises(ValueError, match=r"\['b'\].*larger than axis"):
    _spatial.resolve_rules(aho.block_mean(3), params)
  with pytest.raises(ValueError, match=r"axis 2.*\['b'\]"):
    _spatial.resolve_rules(aho.mean_over_axes(2), params)
  with pytest.raises(ValueError, match="repeats an axis"):
    _spatial.resolve_rules(aho.mean_over_axes(0, -2), {"w": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="does not match the params tree"):
    _spatial.resolve_rules({"w": None, "c": None}, params)
  with pytest.raises(TypeError, match=r"\['w'\].*str"):
    _spatial.resolve_rules({"w": "conv", "b": None}, params)
  with pytest.raises(ValueError, match="block_size"):
    aho.block_mean(0)
  with pytest.raises(TypeError, match="block_size"):
    aho.block_mean(2.5)
  with pytest.raises(TypeError, match="axes"):
    aho.mean_over_axes()
