"""The model zoo: spatial rules and the optimizer on the model code people write.

Small Flax NNX, Linen and Equinox models (unstacked, stacked, bf16), each
with the configuration the spatial-averaging guide documents for it. The
groupings expected of each leaf are written here by hand, from the guide's
table, and computed in NumPy; curvature, eigenvalues and traces are checked
against the exact Hessian of `jax.hessian`.
"""

import dataclasses
import functools
import inspect
from typing import Callable

import chex
import equinox as eqx
import flax.linen as nn
from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adahessian_optax as aho
from adahessian_optax.optimizer import _spatial

B2 = 0.5
PROBES = 24


# ---------------------------------------------------------------------------
# Expected groupings, in NumPy.


def window(*axes):
  """Mean over `axes` (negative: from the end), broadcast back."""
  return lambda x: np.broadcast_to(x.mean(axis=axes, keepdims=True), x.shape)


def blocks(b, axis):
  """Mean over contiguous blocks of `b` entries along `axis`."""
  def apply(x):
    y = np.moveaxis(x, axis, -1).copy()
    for start in range(0, y.shape[-1], b):
      part = y[..., start:start + b]
      y[..., start:start + b] = part.mean(axis=-1, keepdims=True)
    return np.moveaxis(y, -1, axis)
  return apply


def _name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Case:
  """A model as the optimizer sees it.

  `build()` returns `(params, loss, rules, reference)`: the params pytree,
  the loss closure `params -> scalar`, the documented `spatial_averaging`,
  and the loss of the same model run in float32 (for the exact Hessian).
  `helper` maps leaf names to the grouping the guide's table gives with that
  configuration, `default` to the one without it (names not listed: none).
  """

  name: str
  build: Callable[[], tuple]
  helper: dict
  default: dict = dataclasses.field(default_factory=dict)


def _data(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _mse(out, seed=1):
  out = jnp.tanh(out.astype(jnp.float32))
  return jnp.mean((out - _data(out.shape, seed)) ** 2)


def _cast(x, dtype):
  return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _is_bf16(params) -> bool:
  return any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# NNX.


def _nnx_case(make, x, block_size=None, dtype=jnp.float32):
  def build():
    model = make(nnx.Rngs(0), dtype)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    loss = lambda x: aho.nnx_value_fn(lambda m, x: _mse(m(x)), model, x)
    rules = aho.spatial_rules(model, block_size=block_size)
    return params, loss(_cast(x, dtype)), rules, loss(x)
  return build


class NnxLinear(nnx.Module):

  def __init__(self, rngs, dtype):
    self.dense = nnx.Linear(4, 3, param_dtype=dtype, rngs=rngs)
    self.general = nnx.LinearGeneral(3, (2, 2), param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.general(jnp.tanh(self.dense(x)))


class NnxConv(nnx.Module):

  def __init__(self, rngs, dtype):
    self.conv1 = nnx.Conv(2, 3, (3,), param_dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(2, 2, (2, 2), param_dtype=dtype, rngs=rngs)
    self.conv3 = nnx.Conv(2, 2, (2, 2, 2), param_dtype=dtype, rngs=rngs)

  def __call__(self, x):  # x: (batch, 3, 3, 3, 2)
    b = x.shape[0]
    return jnp.concatenate([
        jnp.tanh(self.conv1(x.reshape(b, 27, 2))).mean(axis=1),
        jnp.tanh(self.conv2(x.reshape(b, 9, 3, 2))).mean(axis=(1, 2)),
        jnp.tanh(self.conv3(x)).mean(axis=(1, 2, 3))], axis=-1)


class NnxAttention(nnx.Module):

  def __init__(self, rngs, dtype):
    self.embed = nnx.Embed(6, 4, param_dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(4, param_dtype=dtype, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=2, in_features=4, qkv_features=4, decode=False,
        param_dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(4, 2, param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    h = self.norm(self.embed(tokens))
    return self.head(self.attention(h).mean(axis=1))


class NnxStack(nnx.Module):
  """Three dense layers and three convolutions built with nnx.vmap."""

  def __init__(self, rngs, dtype):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def dense(rngs):
      return nnx.Linear(3, 3, param_dtype=dtype, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def conv(rngs):
      return nnx.Conv(2, 2, (3,), param_dtype=dtype, rngs=rngs)

    self.dense = dense(rngs)
    self.conv = conv(rngs)

  def __call__(self, x):  # x: (batch, 3, 2)
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def convs(h, layer):
      return jnp.tanh(layer(h))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def denses(h, layer):
      return jnp.tanh(layer(h))

    h = convs(x, self.conv)
    return denses(h.reshape(-1, 3), self.dense)


_QKV = ("query", "key", "value")


# ---------------------------------------------------------------------------
# Linen.


def _linen_case(module, x, block_size=None, unbox=False):
  def build():
    params = module.init(jax.random.key(0), x)["params"]
    if unbox:
      params = nn.meta.unbox(params)
    loss = lambda p: _mse(module.apply({"params": p}, x))
    rules = aho.spatial_rules(module, x, block_size=block_size)
    return params, loss, rules, loss
  return build


class LinenDense(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(3)(x))
    return nn.DenseGeneral((2, 2))(h)


class LinenConv(nn.Module):

  @nn.compact
  def __call__(self, x):  # x: (batch, 4, 4, 2)
    h = jnp.tanh(nn.Conv(3, (2, 2))(x))
    h = jnp.tanh(nn.Conv(2, (3,))(h.reshape(-1, 4, 3)))
    return nn.Dense(2)(h.mean(axis=1))


class LinenAttention(nn.Module):

  @nn.compact
  def __call__(self, x):  # x: (batch, length, 4)
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)
    return nn.Dense(2)(h.mean(axis=1))


class _LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    h = jnp.tanh(nn.Conv(2, (3,), name="conv")(h))
    h = jnp.tanh(nn.DenseGeneral(2, name="dense")(h))
    return h, None


class LinenScan(nn.Module):

  @nn.compact
  def __call__(self, x):  # x: (batch, 3, 2)
    stack = nn.scan(_LinenBlock, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    h, _ = stack(name="stack")(x, None)
    return h


# ---------------------------------------------------------------------------
# Equinox (PyTorch layouts).


def _eqx_case(make, x, block_size=None, dtype=jnp.float32):
  """`make(key, dtype)` returns `(model, apply)`."""
  def build():
    model, apply = make(jax.random.key(0), dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss = lambda x: lambda p: _mse(apply(eqx.combine(p, static), x))
    rules = aho.spatial_rules(model, block_size=block_size)
    return params, loss(_cast(x, dtype)), rules, loss(x)
  return build


def _eqx_mlp(key, dtype):
  model = eqx.nn.MLP(4, 2, width_size=3, depth=2, dtype=dtype, key=key)
  return model, lambda m, x: jax.vmap(m)(x)


def _eqx_conv(key, dtype):
  k1, k2, k3 = jax.random.split(key, 3)
  convs = (eqx.nn.Conv1d(2, 3, 3, dtype=dtype, key=k1),
           eqx.nn.Conv2d(2, 2, 2, dtype=dtype, key=k2),
           eqx.nn.Conv3d(2, 2, 2, dtype=dtype, key=k3))

  def apply(m, x):  # x: (batch, 2, 3, 3, 3)
    c1, c2, c3 = m
    def one(v):
      return jnp.concatenate([
          jnp.tanh(c1(v.reshape(2, 27))).mean(axis=1),
          jnp.tanh(c2(v.reshape(2, 9, 3))).mean(axis=(1, 2)),
          jnp.tanh(c3(v)).mean(axis=(1, 2, 3))])
    return jax.vmap(one)(x)
  return convs, apply


def _eqx_attention(key, dtype):
  k1, k2 = jax.random.split(key)
  model = (eqx.nn.MultiheadAttention(2, 4, dtype=dtype, key=k1),
           eqx.nn.Linear(4, 2, dtype=dtype, key=k2))

  def apply(m, x):  # x: (batch, length, 4)
    attention, head = m
    h = jax.vmap(lambda v: attention(v, v, v))(x)
    return jax.vmap(head)(h.mean(axis=1))
  return model, apply


def _eqx_stack(key, dtype):
  k1, k2 = jax.random.split(key)
  dense = eqx.filter_vmap(
      lambda k: eqx.nn.Linear(3, 3, dtype=dtype, key=k))(jax.random.split(k1, 3))
  conv = eqx.filter_vmap(
      lambda k: eqx.nn.Conv1d(2, 2, 3, padding=1, dtype=dtype, key=k))(
          jax.random.split(k2, 3))

  def apply(m, x):  # x: (batch, 2, 3)
    dense, conv = m

    def scan(stack, h, one):
      arrays, static = eqx.partition(stack, eqx.is_array)
      step = lambda h, a: (jnp.tanh(one(eqx.combine(a, static), h)), None)
      return jax.lax.scan(step, h, arrays)[0]

    h = scan(conv, x, lambda layer, h: jax.vmap(layer)(h))
    return scan(dense, h.reshape(-1, 3), lambda layer, h: jax.vmap(layer)(h))
  return (dense, conv), apply


# ---------------------------------------------------------------------------
# Sharded: Linen params in sharding boxes, NNX Variables with shardings.


def _mesh():
  """2x2 devices under the test suite's flags; one device elsewhere."""
  n = 2 if jax.device_count() >= 4 else 1
  return jax.make_mesh((n, n), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)


class NnxSharded(nnx.Module):
  """Every param annotated with nnx.with_partitioning, made on a mesh (NNX
  then places each one on it)."""

  def __init__(self, rngs, dtype):
    init = nnx.initializers.lecun_normal()
    shard = nnx.with_partitioning
    self.embed = nnx.Embed(6, 4, param_dtype=dtype, rngs=rngs,
                           embedding_init=shard(init, ("model", "data")))
    self.norm = nnx.LayerNorm(4, param_dtype=dtype, rngs=rngs,
                              scale_init=shard(nnx.initializers.ones,
                                               ("data",)))
    self.conv = nnx.Conv(4, 4, (3,), param_dtype=dtype, rngs=rngs,
                         kernel_init=shard(init, (None, "data", "model")),
                         bias_init=shard(nnx.initializers.zeros, ("model",)))
    self.attention = nnx.MultiHeadAttention(
        num_heads=2, in_features=4, qkv_features=4, decode=False,
        param_dtype=dtype, rngs=rngs,
        kernel_init=shard(init, ("data", "model", None)))
    self.head = nnx.Linear(4, 2, param_dtype=dtype, rngs=rngs,
                           kernel_init=shard(init, ("data", "model")))

  def __call__(self, tokens):
    h = jnp.tanh(self.conv(self.norm(self.embed(tokens))))
    return self.head(self.attention(h).mean(axis=1))


def _on_mesh(cls):
  def make(rngs, dtype):
    with jax.set_mesh(_mesh()):
      return cls(rngs, dtype)
  return make


class LinenShardedConv(nn.Module):
  """Kernels boxed by both of Linen's sharding annotations."""

  @nn.compact
  def __call__(self, x):  # x: (batch, 4, 4, 2)
    init = nn.initializers.lecun_normal()
    h = nn.Conv(3, (2, 2), kernel_init=nn.with_partitioning(
        init, (None, None, "data", "model")))(x)
    h = nn.Conv(2, (3,), kernel_init=nn.with_logical_partitioning(
        init, (None, "embed", "mlp")))(jnp.tanh(h).reshape(-1, 4, 3))
    return nn.Dense(2, kernel_init=nn.with_partitioning(
        init, ("model", None)))(jnp.tanh(h).mean(axis=1))


# google/flax's examples/lm1b TransformerLM as its params are: module names,
# shapes, and the logical sharding names of every param (written here, not
# copied). Its default position embedding is fixed, not a param; dropout is
# off.


@dataclasses.dataclass(frozen=True)
class Lm1bConfig:
  vocab_size: int = 6
  emb_dim: int = 4
  num_heads: int = 2
  qkv_dim: int = 4
  mlp_dim: int = 8
  num_layers: int = 1


_XAVIER = nn.initializers.xavier_uniform()
_SMALL = nn.initializers.normal(1e-6)


def _logical(init, *names):
  return nn.with_logical_partitioning(init, names)


def _lm1b_norm(name=None):
  return nn.LayerNorm(bias_init=_logical(nn.initializers.zeros, "embed"),
                      scale_init=_logical(nn.initializers.ones, "embed"),
                      name=name)


class _Lm1bMlp(nn.Module):
  config: Lm1bConfig

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.config.mlp_dim,
                 kernel_init=_logical(_XAVIER, "embed", "mlp"),
                 bias_init=_logical(_SMALL, "mlp"))(x)
    return nn.Dense(x.shape[-1], kernel_init=_logical(_XAVIER, "mlp", "embed"),
                    bias_init=_logical(_SMALL, "embed"))(nn.relu(h))


class _Lm1bBlock(nn.Module):
  config: Lm1bConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, qkv_features=c.qkv_dim, use_bias=False,
        kernel_init=_logical(_XAVIER, "embed", "kv"), deterministic=True)(
            _lm1b_norm()(x), mask=mask)
    return x + _Lm1bMlp(c, name="MlpBlock_0")(_lm1b_norm()(x))


class _Lm1bDecoder(nn.Module):
  config: Lm1bConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    y = nn.Embed(c.vocab_size, c.emb_dim, embedding_init=_logical(
        nn.initializers.normal(1.0), "vocab", "embed"))(tokens)
    mask = nn.make_causal_mask(tokens)
    for i in range(c.num_layers):
      y = _Lm1bBlock(c, name=f"encoderdecoderblock_{i}")(y, mask)
    y = _lm1b_norm("encoderdecoder_norm")(y)
    return nn.Dense(c.vocab_size, kernel_init=_logical(_XAVIER, "embed", "vocab"),
                    bias_init=_logical(_SMALL, "vocab"), name="logitdense")(y)


class Lm1bStyleLM(nn.Module):
  config: Lm1bConfig = Lm1bConfig()

  @nn.compact
  def __call__(self, tokens):
    return _Lm1bDecoder(self.config, name="decoder")(tokens)


def _lm1b_table(block, layers=1, boxed=False):
  """Blocks along the input axis of every Dense and attention kernel; the
  embedding, norms and biases keep their own estimates."""
  table = {"decoder/logitdense/kernel": blocks(block, -2)}
  for i in range(layers):
    layer = f"decoder/encoderdecoderblock_{i}/"
    attention = layer + "MultiHeadDotProductAttention_0/"
    table.update({attention + f"{n}/kernel": blocks(block, -3) for n in _QKV})
    table[attention + "out/kernel"] = blocks(block, -2)
    for dense in ("Dense_0", "Dense_1"):
      table[f"{layer}MlpBlock_0/{dense}/kernel"] = blocks(block, -2)
  # A boxed param's array is the box's `value`.
  return {name + ("/value" if boxed else ""): rule
          for name, rule in table.items()}


_TOKENS = jnp.arange(10).reshape(2, 5) % 6
_SHARDED_CONV = {"Conv_0/kernel": window(-4, -3), "Conv_1/kernel": window(-3),
                 "Dense_0/kernel": blocks(2, -2)}


# ---------------------------------------------------------------------------
# The zoo.


def _attention_nnx(block):
  out = {f"attention/{n}/kernel": blocks(block, -3) for n in _QKV}
  out["attention/out/kernel"] = blocks(block, -2)
  out["head/kernel"] = blocks(block, -2)
  return out


CASES = [
    Case("nnx-linear", _nnx_case(NnxLinear, _data((5, 4)), block_size=2),
         helper={"dense/kernel": blocks(2, -2),
                 "general/kernel": blocks(2, -3)}),
    Case("nnx-conv", _nnx_case(NnxConv, _data((2, 3, 3, 3, 2))),
         helper={"conv1/kernel": window(-3),
                 "conv2/kernel": window(-4, -3),
                 "conv3/kernel": window(-5, -4, -3)}),
    Case("nnx-conv-bf16",
         _nnx_case(NnxConv, _data((2, 3, 3, 3, 2)), dtype=jnp.bfloat16),
         helper={"conv1/kernel": window(-3),
                 "conv2/kernel": window(-4, -3),
                 "conv3/kernel": window(-5, -4, -3)}),
    Case("nnx-attention",
         _nnx_case(NnxAttention, jnp.arange(10).reshape(2, 5) % 6,
                   block_size=2),
         helper=_attention_nnx(2)),
    Case("nnx-vmap-stack", _nnx_case(NnxStack, _data((4, 3, 2)),
                                     block_size=2),
         helper={"conv/kernel": window(-3), "dense/kernel": blocks(2, -2)}),
    Case("nnx-vmap-stack-bf16",
         _nnx_case(NnxStack, _data((4, 3, 2)), block_size=2,
                   dtype=jnp.bfloat16),
         helper={"conv/kernel": window(-3), "dense/kernel": blocks(2, -2)}),
    Case("linen-dense", _linen_case(LinenDense(), _data((5, 4)), block_size=2),
         helper={"Dense_0/kernel": blocks(2, -2),
                 "DenseGeneral_0/kernel": blocks(2, -3)}),
    Case("linen-conv", _linen_case(LinenConv(), _data((2, 4, 4, 2))),
         helper={"Conv_0/kernel": window(-4, -3), "Conv_1/kernel": window(-3)}),
    Case("linen-attention",
         _linen_case(LinenAttention(), _data((2, 3, 4)), block_size=2),
         helper={**{f"MultiHeadDotProductAttention_0/{n}/kernel":
                    blocks(2, -3) for n in _QKV},
                 "MultiHeadDotProductAttention_0/out/kernel": blocks(2, -2),
                 "Dense_0/kernel": blocks(2, -2)}),
    Case("linen-scan", _linen_case(LinenScan(), _data((4, 3, 2)),
                                   block_size=2),
         helper={"stack/conv/kernel": window(-3),
                 "stack/dense/kernel": blocks(2, -2)}),
    Case("eqx-mlp", _eqx_case(_eqx_mlp, _data((5, 4)), block_size=2),
         helper={f"layers/{i}/weight": blocks(2, -1) for i in range(3)}),
    Case("eqx-conv", _eqx_case(_eqx_conv, _data((2, 2, 3, 3, 3))),
         helper={"0/weight": window(-1), "1/weight": window(-2, -1),
                 "2/weight": window(-3, -2, -1)},
         default={"0/weight": window(-1), "1/weight": window(-2, -1),
                  "2/weight": window(-3, -2, -1)}),
    Case("eqx-attention",
         _eqx_case(_eqx_attention, _data((2, 3, 4)), block_size=2),
         helper={**{f"0/{n}_proj/weight": blocks(2, -1)
                    for n in ("query", "key", "value", "output")},
                 "1/weight": blocks(2, -1)}),
    Case("eqx-vmap-stack", _eqx_case(_eqx_stack, _data((4, 2, 3)),
                                     block_size=2),
         helper={"0/weight": blocks(2, -1), "1/weight": window(-1)},
         default={"1/weight": window(-1)}),
    Case("eqx-vmap-stack-bf16",
         _eqx_case(_eqx_stack, _data((4, 2, 3)), dtype=jnp.bfloat16),
         helper={"1/weight": window(-1)},
         default={"1/weight": window(-1)}),
    Case("nnx-sharded", _nnx_case(_on_mesh(NnxSharded), _TOKENS,
                                  block_size=2),
         helper={"conv/kernel": window(-3), **_attention_nnx(2)}),
    Case("linen-sharded-conv-boxed",
         _linen_case(LinenShardedConv(), _data((2, 4, 4, 2)), block_size=2),
         helper={f"{name}/value": rule
                 for name, rule in _SHARDED_CONV.items()}),
    Case("linen-sharded-conv-unboxed",
         _linen_case(LinenShardedConv(), _data((2, 4, 4, 2)), block_size=2,
                     unbox=True),
         helper=_SHARDED_CONV),
    Case("linen-lm1b-boxed", _linen_case(Lm1bStyleLM(), _TOKENS, block_size=2),
         helper=_lm1b_table(2, boxed=True)),
    Case("linen-lm1b-unboxed",
         _linen_case(Lm1bStyleLM(), _TOKENS, block_size=2, unbox=True),
         helper=_lm1b_table(2)),
]


def _case_id(case):
  return case.name


# One model of each framework, stacked, and lm1b's in its sharding boxes, in
# the default test run; the whole zoo with the slow tests (many probes,
# Lanczos, compiles per model).
_FAST = ("nnx-vmap-stack", "linen-scan", "eqx-conv", "linen-lm1b-boxed")
SOME = [pytest.param(c, id=c.name, marks=() if c.name in _FAST
                     else pytest.mark.slow) for c in CASES]


class Model:
  """A built case; its exact Hessian is computed on first use."""

  def __init__(self, case: Case):
    self.case = case
    self.params, self.loss, self.rules, self._reference = case.build()
    wide = jax.tree.map(lambda x: x.astype(jnp.float32), self.params)
    self._flat, self.unravel = ravel_pytree(wide)

  @functools.cached_property
  def hessian(self) -> np.ndarray:
    """Exact, over the params in float32, in float64."""
    h = jax.jit(jax.hessian(lambda f: self._reference(self.unravel(f))))(
        self._flat)
    return np.asarray(h, np.float64)


_BUILT = {}


def _model(case: Case) -> Model:
  """Builds a case once per test session."""
  if case.name not in _BUILT:
    _BUILT[case.name] = Model(case)
  return _BUILT[case.name]


def _leaves(model: Model, flat: np.ndarray) -> dict:
  """A flat vector over the params, as leaves by name."""
  tree = model.unravel(jnp.asarray(flat, jnp.float32))
  return {_name(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _grouping(expected: dict, name: str):
  return expected.get(name, lambda x: x)


# ---------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rules_are_the_table(case):
  """The resolved rules average each leaf exactly as the guide's table says,
  with the documented configuration and with the default."""
  model = _model(case)
  default = inspect.signature(aho.adahessian).parameters[
      "spatial_averaging"].default
  for spec, expected in ((model.rules, case.helper),
                         (default, case.default)):
    rules = _spatial.resolve_rules(spec, model.params)
    paths = jax.tree_util.tree_leaves_with_path(model.params)
    named = {_name(p) for p, _ in paths}
    assert set(expected) <= named, sorted(named)
    rng = np.random.default_rng(0)
    for rule, (path, leaf) in zip(rules, paths):
      x = rng.uniform(0.5, 2.0, size=leaf.shape)
      got = x if rule is None else np.asarray(
          rule.apply(jnp.asarray(x, jnp.float32)), np.float64)
      want = _grouping(expected, _name(path))(x)
      np.testing.assert_allclose(got, want, rtol=1e-6,
                                 err_msg=f"{case.name}: {_name(path)}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_one_refresh_stores_the_averaged_exact_diagonal(case):
  """sqrt(v_hat) after one refresh of PROBES probes is the documented
  average of |diag H|, within 6 standard deviations of Hutchinson's
  estimate: Var(z_i (Hz)_i) = sum_{j != i} H_ij^2 for Rademacher z."""
  model = _model(case)
  h = model.hessian
  exact = _leaves(model, np.abs(np.diag(h)))
  off = (h ** 2).sum(axis=1) - np.diag(h) ** 2
  sigma = _leaves(model, np.sqrt(off / PROBES))
  tx = aho.scale_by_adahessian(b2=B2, key=0, n_samples=PROBES,
                               spatial_averaging=model.rules)
  state = tx.init(model.params)
  grads = jax.grad(model.loss)(model.params)
  # Outside jit: the PROBES tangent passes are unrolled, and compiling them
  # as one program takes longer than running them op by op.
  _, state = tx.update(grads, state, model.params, value_fn=model.loss)
  bf16 = _is_bf16(model.params)
  stored = jax.tree_util.tree_leaves_with_path(state.nu)
  for path, nu in stored:
    name = _name(path)
    group = _grouping(case.helper, name)
    got = np.sqrt(np.asarray(nu, np.float64) / (1 - B2))
    want = group(exact[name])
    # bf16 params: the model itself runs in bf16 (8 bits of mantissa).
    tol = group(6 * sigma[name]) + (0.05 * want + 1e-3 if bf16 else 1e-5)
    assert np.all(np.abs(got - want) <= tol), (
        f"{case.name}: {name}: max excess "
        f"{np.max(np.abs(got - want) - tol)}")


@pytest.mark.parametrize("case", SOME)
def test_fused_step_equals_plain_and_steps_lower_the_loss(case):
  model = _model(case)
  tx = aho.adahessian(0.05, weight_decay=1e-3, key=3,
                      spatial_averaging=model.rules)
  state = tx.init(model.params)

  @jax.jit
  def plain(params, state):
    grads = jax.grad(model.loss)(params)
    updates, state = tx.update(grads, state, params, value_fn=model.loss)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def fused(params, state):
    _, grads, hessian = aho.value_grad_and_hessian(model.loss, params, state)
    updates, state = tx.update(grads, state, params, hessian=hessian)
    return optax.apply_updates(params, updates), state

  a, sa = plain(model.params, state)
  b, sb = fused(model.params, state)
  bf16 = _is_bf16(model.params)
  chex.assert_trees_all_close(a, b, atol=1e-2 if bf16 else 1e-6)
  chex.assert_trees_all_close(sa, sb, atol=1e-2 if bf16 else 1e-6)

  params = model.params
  for _ in range(8):
    params, state = fused(params, state)
  chex.assert_tree_all_finite(params)
  assert float(model.loss(params)) < float(model.loss(model.params))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_top_eigenvalue_and_trace_are_the_exact_ones(case):
  """Lanczos' top eigenvalue and Hutchinson's trace against eigvalsh and
  the exact trace, whose estimate has variance
  2 (||H||_F^2 - sum_i H_ii^2) / S for Rademacher probes."""
  model = _model(case)
  rtol = 5e-2 if _is_bf16(model.params) else 2e-3  # bf16: the model's noise
  eigenvalues = np.linalg.eigvalsh(model.hessian)
  top, _, _ = aho.hessian_eigenvalues(model.loss, model.params, key=0, k=1,
                                   n_steps=eigenvalues.size)
  np.testing.assert_allclose(float(top[0]), eigenvalues[-1], rtol=rtol,
                             atol=1e-4 * np.abs(eigenvalues).max())
  h = model.hessian
  n = 200
  trace = aho.hessian_trace(model.loss, model.params, key=1, n_samples=n)
  sd = np.sqrt(2 * ((h ** 2).sum() - (np.diag(h) ** 2).sum()) / n)
  assert abs(float(trace.estimate) - np.trace(h)) <= (
      5 * sd + rtol * np.abs(h).sum() / 10 + 1e-4)


# ---------------------------------------------------------------------------
# The default on a bare pytree, and errors.


def test_default_keeps_stacked_layers_apart():
  """A (layers, heads, head_dim) bias with curvature 2 on layer 0 and 200 on
  layer 1 (0.2's rank-based default stored 101 for both)."""
  curvature = jnp.array([1.0, 100.0])[:, None, None]
  loss = lambda p: jnp.sum(curvature * p["bias"] ** 2)
  params = {"bias": jnp.ones((2, 3, 4))}
  tx = aho.scale_by_adahessian(b2=B2, key=0)
  _, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
                       value_fn=loss)
  stored = np.sqrt(np.asarray(state.nu["bias"]) / (1 - B2))
  np.testing.assert_allclose(stored[0], 2.0, rtol=1e-6)
  np.testing.assert_allclose(stored[1], 200.0, rtol=1e-6)


def test_default_averages_equinox_convolutions_only():
  conv = eqx.nn.Conv2d(2, 3, 2, key=jax.random.key(0))
  params = eqx.filter(conv, eqx.is_inexact_array)
  default = inspect.signature(aho.adahessian).parameters[
      "spatial_averaging"].default
  rules = _spatial.resolve_rules(default, params)
  assert rules == [aho.mean_over_axes(-2, -1), None]  # weight, bias
  as_dict = {"weight": conv.weight, "bias": conv.bias}  # no module types
  assert _spatial.resolve_rules(default, as_dict) == [None, None]


def test_spatial_rules_errors_name_the_problem():
  model = NnxLinear(nnx.Rngs(0), jnp.float32)
  rules = aho.spatial_rules(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match=r"no leaf \['extra'\]"):
    rules({**params, "extra": jnp.ones(2)})
  wrong = jax.tree.map(lambda x: x, params)
  wrong["dense"]["kernel"] = jnp.ones((5, 3))
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\] has shape "
                     r"\(5, 3\), but the model's has \(4, 3\)"):
    aho.adahessian(0.1, key=0, spatial_averaging=rules).init(wrong)
  with pytest.raises(TypeError, match="got dict"):
    aho.spatial_rules({"w": jnp.ones((3, 3, 2, 4))})
  with pytest.raises(TypeError, match="example inputs"):
    aho.spatial_rules(LinenConv())
  with pytest.raises(TypeError, match="Linen modules only"):
    aho.spatial_rules(model, jnp.ones(3))
  with pytest.raises(ValueError, match="block_size must be >= 1"):
    aho.spatial_rules(model, block_size=0)
  with pytest.raises(TypeError, match="block_size must be an int"):
    aho.spatial_rules(model, block_size=2.0)


def test_spatial_rules_fit_every_form_of_the_params():
  """NNX states of Variables or of arrays, Linen's params or whole
  variables dict: the same rules."""
  model = NnxStack(nnx.Rngs(0), jnp.float32)
  rules = aho.spatial_rules(model, block_size=2)
  arrays = nnx.as_pure(nnx.state(model, nnx.Param))
  variables = nnx.state(model, nnx.Param)
  assert (_spatial.resolve_rules(rules, arrays)
          == _spatial.resolve_rules(rules, variables))
  x = _data((4, 3, 2))
  linen_rules = aho.spatial_rules(LinenScan(), x)
  v = LinenScan().init(jax.random.key(0), x)
  assert (_spatial.resolve_rules(linen_rules, v)
          == _spatial.resolve_rules(linen_rules, v["params"]))
  assert aho.mean_over_axes(-3) in _spatial.resolve_rules(linen_rules, v)


# ---------------------------------------------------------------------------
# Sharded models, as their training scripts run them.


_LOGICAL_AXES = (("mlp", "tensor"), ("vocab", "tensor"), ("embed", "fsdp"),
                 ("heads", "tensor"))


def _cross_entropy(model, params, tokens):
  logits = model.apply({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


def test_lm1b_steps_alike_on_its_boxed_and_unboxed_sharded_state():
  """lm1b's setup: the TrainState made with boxed params (so tx.init sees
  the boxes) on a mesh from its logical axis rules, then unboxed, as its
  train.py does before the first step."""
  model, tokens = Lm1bStyleLM(), _TOKENS
  rules = aho.spatial_rules(model, tokens, block_size=2)
  tx = aho.adahessian(0.05, key=0, spatial_averaging=rules)

  def create(key):
    params = model.init(key, tokens)["params"]
    return aho.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  n = 2 if jax.device_count() >= 4 else 1
  mesh = jax.make_mesh((1, n, n), ("data", "fsdp", "tensor"),
                       axis_types=(AxisType.Auto,) * 3)
  specs = nn.get_partition_spec(jax.eval_shape(create, jax.random.key(0)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(_LOGICAL_AXES):
    shardings = nn.logical_to_mesh_sharding(specs, mesh, _LOGICAL_AXES)
    boxed = jax.jit(create, out_shardings=shardings)(jax.random.key(0))
  unboxed = nn.meta.unbox(boxed)
  assert (_spatial.resolve_rules(rules, boxed.params)
          == _spatial.resolve_rules(rules, unboxed.params))

  loss = functools.partial(_cross_entropy, model, tokens=tokens)

  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss)(state.params),
                                 value_fn=loss)

  from_boxed, from_unboxed = step(boxed), step(unboxed)
  embedding = from_boxed.params["decoder"]["Embed_0"]["embedding"]
  assert isinstance(embedding, nn.LogicallyPartitioned)
  chex.assert_trees_all_close(nn.meta.unbox(from_boxed.params),
                              from_unboxed.params, atol=1e-6)
  assert float(loss(from_unboxed.params)) < float(loss(unboxed.params))
  for got, want in zip(jax.tree.leaves(from_unboxed.params),
                       jax.tree.leaves(shardings.params)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)


def test_nnx_sharded_model_steps_and_keeps_its_shardings():
  """NNX's sharding guide: model and optimizer made on the mesh, the step
  jitted; every annotated param keeps the sharding its metadata names (XLA
  may shard the others as it likes)."""
  mesh = _mesh()
  with jax.set_mesh(mesh):
    model = NnxSharded(nnx.Rngs(0), jnp.float32)
    rules = aho.spatial_rules(model, block_size=2)
    optimizer = nnx.Optimizer(
        model, aho.adahessian(0.05, key=0, spatial_averaging=rules),
        wrt=nnx.Param)
  variables = nnx.state(model, nnx.Param)  # Params with their shardings
  assert (_spatial.resolve_rules(rules, variables)
          == _spatial.resolve_rules(rules, nnx.as_pure(variables)))
  target = _data((2, 2), seed=1)
  loss_fn = lambda m: jnp.mean((jnp.tanh(m(_TOKENS)) - target) ** 2)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value_fn=aho.nnx_value_fn(loss_fn, model))
    return loss

  with jax.set_mesh(mesh):
    first = step(model, optimizer)
    assert float(step(model, optimizer)) < float(first)
  specs = nnx.as_pure(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    if spec == jax.sharding.PartitionSpec():
      continue
    want = jax.sharding.NamedSharding(mesh, spec)
    assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, spec)


def test_spatial_rules_errors_on_boxed_params_name_the_leaf():
  x = _data((2, 4, 4, 2))
  rules = aho.spatial_rules(LinenShardedConv(), x)
  params = LinenShardedConv().init(jax.random.key(0), x)["params"]
  wrong = {**params, "Dense_0": {**params["Dense_0"], "kernel": nn.Partitioned(
      jnp.ones((3, 2)), ("model", None))}}
  with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\]\.value has "
                     r"shape \(3, 2\), but the model's has \(2, 2\)"):
    rules(wrong)
  extra = {**params, "extra": nn.Partitioned(jnp.ones(2), ("model",))}
  with pytest.raises(ValueError, match=r"no leaf \['extra'\]\.value"):
    rules(extra)

  class TwoArraysInABox(nn.Module):

    @nn.compact
    def __call__(self, x):
      pair = self.param("pair", lambda key: nn.Partitioned(
          (jnp.ones(2), jnp.ones(3)), ("model",)))
      return x * pair[0].sum()

  with pytest.raises(ValueError, match=r"\['pair'\] is a Partitioned box "
                     "holding 2 arrays"):
    aho.spatial_rules(TwoArraysInABox(), jnp.ones(2))
