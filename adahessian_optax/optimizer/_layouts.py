"""Spatial-averaging rules read from what a model says its layers are.

A leaf's rank cannot tell a convolution kernel from a stacked or an attention
kernel, so the rules come from the module that owns each leaf: NNX and
Equinox module objects, and the Linen modules seen while the model is
initialised. Every rule counts its axes from the end of the leaf, so leading
stacked-layer axes (``nn.scan``, ``nnx.vmap``, ``eqx.filter_vmap``) are never
averaged over. The frameworks are imported only when a model of theirs is
given.
"""

import dataclasses
import functools
import math
import sys
from typing import Any, Callable, Optional

import jax

from adahessian_optax.optimizer import _spatial
from adahessian_optax import _tree

Path = tuple


def _names(path: Any) -> Path:
  """A key path as plain names and indices."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _framework(model: Any) -> Optional[str]:
  for cls in type(model).__mro__:
    module = cls.__module__ or ""
    for prefix, name in (("flax.nnx", "nnx"), ("flax.linen", "linen"),
                         ("equinox", "equinox")):
      if module == prefix or module.startswith(prefix + "."):
        return name
  return None


def _window_mean_flax(spatial_dims: int) -> _spatial.SpatialRule:
  """Flax kernels ``(..., window..., in, out)``: the window before the last
  two axes."""
  return _spatial.MeanOverAxes(tuple(range(-spatial_dims - 2, -2)))


def _window_mean_torch(spatial_dims: int) -> _spatial.SpatialRule:
  """PyTorch/Equinox weights ``(..., out, in, window...)``: the last axes."""
  return _spatial.MeanOverAxes(tuple(range(-spatial_dims, 0)))


def _input_blocks(block_size: Optional[int], shape: tuple, axis: int,
                  period: Optional[int] = None) -> Optional[_spatial.SpatialRule]:
  """Blocks of at most `block_size` entries along the input-feature `axis`.

  A block never holds more entries than the axis has, and with `period`
  (the head size of heads flattened into one axis) it never crosses a head.
  """
  if block_size is None or len(shape) < -axis:
    return None
  size = min(block_size, shape[axis])
  if period is not None:
    size = math.gcd(size, period)
  return None if size == 1 else _spatial.BlockMean(size, axis)


def _spatial_dims(kernel_size: Any) -> int:
  return len(kernel_size) if isinstance(kernel_size, (tuple, list)) else 1


@dataclasses.dataclass(frozen=True)
class ModelRules:
  """The rule of every leaf of a model, keyed by its path of names.

  Calling it with the params the optimizer sees returns one rule (or
  ``None``) per leaf; a float leaf that is not one of the model's, or whose
  shape differs, is an error that names it.
  """

  source: str
  rules: dict  # path -> rule or None, for every array leaf of the model
  shapes: dict  # path -> shape

  def _find(self, path: Any) -> Optional[Path]:
    names = _names(path)
    # NNX states of Variables, and Linen params in sharding boxes
    # (nn.Partitioned, nn.LogicallyPartitioned), end in `.value`; a Linen
    # variables dict starts with its "params" collection.
    tails = [names] + ([names[:-1]] if names[-1:] == ("value",) else [])
    for tail in list(tails):
      if tail[:1] == ("params",):
        tails.append(tail[1:])
    return next((t for t in tails if t in self.rules), None)

  def __call__(self, params: Any) -> Any:
    def rule(path, leaf):
      if not _tree.is_differentiable(leaf):
        return None
      found = self._find(path)
      where = _tree.path_str(path)
      if found is None:
        raise ValueError(
            f"spatial_rules({self.source}) has no leaf {where}: give the "
            "optimizer the params of the model the rules were made from, "
            "with the same paths (for example nnx.state(model, nnx.Param), "
            "Linen's variables['params'], boxed or unboxed, eqx.filter(model, "
            "eqx.is_inexact_array))")
      if tuple(leaf.shape) != self.shapes[found]:
        raise ValueError(
            f"spatial_rules({self.source}): the leaf {where} has shape "
            f"{tuple(leaf.shape)}, but the model's has {self.shapes[found]}")
      return self.rules[found]
    return jax.tree_util.tree_map_with_path(rule, params)

  def __repr__(self):
    lines = [f"spatial_rules({self.source}):"]
    for path, rule in self.rules.items():
      shape = "x".join(map(str, self.shapes[path])) or "scalar"
      lines.append(f"  {'/'.join(map(str, path))} ({shape}): {rule}")
    return "\n".join(lines)


def _leaves(tree: Any, is_box: Callable[[Any], bool] = lambda x: False
            ) -> dict:
  """The shape of every array by path; a box (`is_box`: metadata around one
  array) counts as its array, at the box's own path."""
  shapes = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_box):
    if is_box(x):
      inside = jax.tree.leaves(x)
      if len(inside) != 1:
        raise ValueError(
            f"spatial_rules: the param {_tree.path_str(path)} is a "
            f"{type(x).__name__} box holding {len(inside)} arrays; a box "
            "must hold one")
      x = inside[0]
    if hasattr(x, "shape"):
      shapes[_names(path)] = tuple(x.shape)
  return shapes


def _output_axes(node: Any) -> int:
  """How many output axes a Flax DenseGeneral/LinearGeneral kernel has."""
  features = getattr(node, "out_features", None)
  if features is None:
    features = node.features
  return len(features) if isinstance(features, (tuple, list)) else 1


def _flax_rules(modules: Any, shapes: dict, block_size: Optional[int],
                conv: tuple, dense: tuple, general: tuple) -> dict:
  """Rules of Flax kernels, from `(path, module)` pairs of NNX or Linen."""
  rules = dict.fromkeys(shapes)
  for path, node in modules:
    kernel = tuple(path) + ("kernel",)
    if kernel not in shapes:
      continue
    if isinstance(node, conv):
      rules[kernel] = _window_mean_flax(_spatial_dims(node.kernel_size))
    elif isinstance(node, dense):
      rules[kernel] = _input_blocks(block_size, shapes[kernel], -2)
    elif isinstance(node, general):
      rules[kernel] = _input_blocks(block_size, shapes[kernel],
                                    -_output_axes(node) - 1)
  return rules


def _nnx_rules(model: Any, block_size: Optional[int]) -> tuple[dict, dict]:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  shapes = _leaves(nnx.as_pure(nnx.state(model)))
  rules = _flax_rules(nnx.iter_graph(model), shapes, block_size,
                      (nnx.Conv, nnx.ConvTranspose), (nnx.Linear,),
                      (nnx.LinearGeneral,))
  return rules, shapes


def _linen_rules(module: Any, args: tuple, kwargs: dict,
                 block_size: Optional[int]) -> tuple[dict, dict]:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  modules = {}

  def record(next_fun, call_args, call_kwargs, context):
    if context.method_name == "__call__" and context.module.path is not None:
      modules[tuple(context.module.path)] = context.module
    return next_fun(*call_args, **call_kwargs)

  key = jax.random.key(0)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(
        functools.partial(module.init, **kwargs),
        {"params": key, "dropout": key}, *args)
  if "params" not in variables:
    raise ValueError(
        f"spatial_rules: {type(module).__name__}.init created no 'params' "
        "collection with these inputs")
  # Sharding annotations (nn.with_partitioning, nn.with_logical_partitioning)
  # box each param; the rules are keyed by the unboxed paths. The boxes are
  # not unboxed here: under a mesh that would add sharding constraints.
  shapes = _leaves(variables["params"],
                   lambda x: isinstance(x, nn.meta.AxisMetadata))
  rules = _flax_rules(modules.items(), shapes, block_size,
                      (nn.Conv, nn.ConvTranspose), (nn.Dense,),
                      (nn.DenseGeneral,))
  return rules, shapes


def _equinox_rules(tree: Any, block_size: Optional[int]) -> tuple[dict, dict]:
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  shapes = _leaves(tree)
  rules = dict.fromkeys(shapes)
  kinds = (eqx.nn.Conv, eqx.nn.ConvTranspose, eqx.nn.MultiheadAttention,
           eqx.nn.Linear)
  layers, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, kinds))

  def put(path, rule_of_shape):
    if path in shapes:
      rules[path] = rule_of_shape(shapes[path])

  for path, node in layers:
    path = _names(path)
    if isinstance(node, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
      put(path + ("weight",),
          lambda s, n=node.num_spatial_dims: _window_mean_torch(n))
    elif isinstance(node, eqx.nn.Linear):
      put(path + ("weight",), lambda s: _input_blocks(block_size, s, -1))
    elif isinstance(node, eqx.nn.MultiheadAttention):
      for name in ("query_proj", "key_proj", "value_proj"):
        put(path + (name, "weight"),
            lambda s: _input_blocks(block_size, s, -1))
      put(path + ("output_proj", "weight"),
          lambda s, n=node.vo_size: _input_blocks(block_size, s, -1, n))
  return rules, shapes


def _holds_equinox(tree: Any) -> bool:
  """Whether a container (tuple, list, dict) holds Equinox modules."""
  if "equinox" not in sys.modules:
    return False
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  is_module = lambda x: isinstance(x, eqx.Module)
  return any(is_module(x) for x in jax.tree.leaves(tree, is_leaf=is_module))


def default_rules(params: Any) -> Any:
  """The default ``spatial_averaging``: the convolutions the params say are.

  Equinox modules are themselves pytree nodes, so their convolution weights
  are found in the params; nothing else is averaged, since a bare array's
  rank cannot tell a convolution kernel from a stacked or attention kernel.
  """
  if "equinox" not in sys.modules:
    return None
  rules, _ = _equinox_rules(params, None)
  if not any(rules.values()):
    return None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: rules.get(_names(path)), params)


def spatial_rules(model: Any, *args: Any, block_size: Optional[int] = None,
                  **kwargs: Any) -> Callable[[Any], Any]:
  r"""AdaHessian's spatial-averaging rules for a Flax NNX, Linen or Equinox model.

  Each leaf's rule follows from the module that owns it, never from its
  rank:

  .. math::
    \bar D_i = \frac{1}{|G(i)|} \sum_{j \in G(i)} |D_j|,

  where the group :math:`G(i)` of a convolution kernel entry is the kernel
  window of its (input, output) channel pair, and, with ``block_size``
  :math:`= b`, the group of a dense or attention kernel entry is a block of
  :math:`b` consecutive input features of its output unit (and head). Every
  other leaf (biases, norm scales, embeddings) keeps its own estimate, and no
  group spans a stacked-layer axis. The layouts:

  * Flax convolutions ``(..., window..., in, out)``: the window axes;
    PyTorch-layout Equinox ``(..., out, in, window...)``: the last axes;
  * Flax ``Dense``/NNX ``Linear`` ``(..., in, out)``, Equinox ``Linear``
    ``(..., out, in)``, ``DenseGeneral``/``LinearGeneral`` (query, key and
    value ``(in, heads, head_dim)``, output ``(heads, head_dim, out)``):
    blocks along the last input axis, so per head for attention; Equinox
    attention's output projection, whose input axis holds the heads one
    after the other, takes blocks that divide the head size.

  A block is never longer than its axis. The paper averaged convolution
  windows in its CNN runs and used :math:`b = 32` for its Transformers.
  Sharding annotations change no rule: a Linen param boxed by
  ``nn.with_partitioning`` or ``nn.with_logical_partitioning`` gets the rule
  of the array in its box, and NNX Params carrying a sharding are read as
  any other.

  Args:
    model: an NNX :class:`flax.nnx.Module`; a Linen :class:`flax.linen.Module`
      (followed by the example inputs of its ``__call__``, from which its
      layers and shapes are traced with :func:`jax.eval_shape`); or an
      Equinox :class:`equinox.Module`, or a tuple, list or dict of them (the
      model or its filtered params).
    *args: for a Linen module, the inputs of ``module.init`` after the key.
    block_size: :math:`b \ge 1` to average dense and attention kernels in
      blocks of input features, or ``None`` (the default) to leave them.
    **kwargs: for a Linen module, keyword inputs of ``module.init``.

  Returns:
    A function ``params -> rules`` for the ``spatial_averaging`` argument of
    :func:`adahessian`. It takes the params the optimizer sees (for NNX,
    ``nnx.state(model, nnx.Param)``; for Linen, ``variables["params"]`` or
    the whole variables dict, in their sharding boxes or unboxed with
    ``nn.meta.unbox``; for Equinox, the filtered model) and raises a
    ValueError naming any float leaf that is not the model's. Its ``repr``
    lists every leaf with its rule, by its unboxed path.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import adahessian_optax as aho
    >>> class CNN(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    ...     self.head = nnx.Linear(4, 2, rngs=rngs)
    >>> rules = aho.spatial_rules(CNN(nnx.Rngs(0)))
    >>> print(rules)
    spatial_rules(CNN):
      conv/bias (4): None
      conv/kernel (3x3x1x4): MeanOverAxes(axes=(-4, -3))
      head/bias (2): None
      head/kernel (4x2): None
    >>> tx = aho.adahessian(0.15, key=0, spatial_averaging=rules)

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021 (section 3.3).
  """
  if block_size is not None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
      raise TypeError(f"block_size must be an int or None, got {block_size!r}")
    if block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {block_size}")
  framework = _framework(model)
  if framework != "linen" and (args or kwargs):
    raise TypeError(
        "spatial_rules takes example inputs for Linen modules only; an "
        f"{framework or type(model).__name__} model is read as it is")
  if framework == "nnx":
    rules, shapes = _nnx_rules(model, block_size)
  elif framework == "linen":
    if not args and not kwargs:
      raise TypeError(
          "spatial_rules needs a Linen module's example inputs, as in "
          "module.init(key, *inputs): spatial_rules(module, x)")
    rules, shapes = _linen_rules(model, args, kwargs, block_size)
  elif framework == "equinox" or _holds_equinox(model):
    rules, shapes = _equinox_rules(model, block_size)
  else:
    raise TypeError(
        "spatial_rules takes a Flax NNX module, a Linen module with its "
        "example inputs, or an Equinox module; got "
        f"{type(model).__name__}. For a plain pytree give the rules "
        "yourself (aho.mean_over_axes, aho.block_mean) as a pytree prefix")
  if not shapes:
    raise ValueError(f"spatial_rules: {type(model).__name__} has no arrays")
  return ModelRules(type(model).__name__, rules, shapes)
