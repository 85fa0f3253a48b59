"""Spatial averaging of the Hessian-diagonal estimate, one rule per leaf."""

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from adahessian_optax import _tree


class SpatialRule:
  """Base class of the rules that average a leaf's diagonal estimate.

  A rule maps an array to an array of the same shape, replacing entries by the
  mean over the group they belong to. Rules are deliberately not callable, so
  that a rule and a function ``params -> rules`` cannot be confused.
  """

  def check(self, shape: tuple[int, ...], where: str) -> None:
    """Raises ValueError when the rule does not fit a leaf of `shape`."""

  def apply(self, x: jax.Array) -> jax.Array:
    """Returns `x` with each entry replaced by the mean of its group."""
    raise NotImplementedError


def _normalize_axis(axis: int, ndim: int, where: str, rule: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"{rule} averages over axis {axis}, but the leaf {where} has only "
        f"{ndim} dimension(s)")
  return axis % ndim


@dataclasses.dataclass(frozen=True)
class MeanOverAxes(SpatialRule):
  """Mean over the given axes, broadcast back (see :func:`mean_over_axes`)."""

  axes: tuple[int, ...]

  def check(self, shape, where):
    axes = [_normalize_axis(a, len(shape), where, repr(self)) for a in self.axes]
    if len(set(axes)) != len(axes):
      raise ValueError(f"{self!r} repeats an axis for the leaf {where}")

  def apply(self, x):
    mean = jnp.mean(x, axis=self.axes, keepdims=True)
    return jnp.broadcast_to(mean, x.shape)


@dataclasses.dataclass(frozen=True)
class BlockMean(SpatialRule):
  """Mean over contiguous blocks along one axis (see :func:`block_mean`)."""

  block_size: int
  axis: int = -1

  def check(self, shape, where):
    axis = _normalize_axis(self.axis, len(shape), where, repr(self))
    if self.block_size > shape[axis]:
      raise ValueError(
          f"{self!r} does not fit the leaf {where} of shape {shape}: the block "
          f"is larger than axis {self.axis} ({shape[axis]} entries)")

  def apply(self, x):
    # Blocks are split in place, (..., n, ...) -> (..., n / b, b, ...): moving
    # the axis last made XLA write a transposed copy of the whole estimate.
    axis = self.axis % x.ndim
    n = x.shape[axis]
    whole = (n // self.block_size) * self.block_size
    parts = []
    if whole:
      parts.append(_block_means(jax.lax.slice_in_dim(x, 0, whole, axis=axis),
                                axis, self.block_size))
    if whole < n:
      parts.append(_block_means(jax.lax.slice_in_dim(x, whole, n, axis=axis),
                                axis, n - whole))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _block_means(x, axis: int, size: int):
  """Each run of ``size`` entries along ``axis`` replaced by its mean."""
  blocks = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  mean = jnp.mean(x.reshape(blocks), axis=axis + 1, keepdims=True)
  return jnp.broadcast_to(mean, blocks).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class ConvWindowMean(SpatialRule):
  """Mean over all axes but the last two (see :func:`conv_window_mean`)."""

  def apply(self, x):
    if x.ndim < 3:
      return x
    return MeanOverAxes(tuple(range(x.ndim - 2))).apply(x)


def mean_over_axes(*axes: int) -> MeanOverAxes:
  r"""Rule that averages a leaf's estimate over ``axes`` and broadcasts it back.

  .. math::
    \bar D_{i} = \frac{1}{|G(i)|} \sum_{j \in G(i)} |D_j|

  where :math:`G(i)` is the set of entries that agree with :math:`i` on every
  axis not in ``axes``.

  Args:
    *axes: the axes to average over (negative values count from the end).

  Returns:
    A :class:`SpatialRule`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> rule = aho.mean_over_axes(0)
    >>> print(rule.apply(jnp.array([[1.0, 2.0], [3.0, 6.0]])))
    [[2. 4.]
     [2. 4.]]

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, 2021 (section 3.3).
  """
  if not axes or not all(isinstance(a, int) and not isinstance(a, bool)
                         for a in axes):
    raise TypeError(f"mean_over_axes needs one or more int axes, got {axes!r}")
  return MeanOverAxes(tuple(axes))


def block_mean(block_size: int, axis: int = -1) -> BlockMean:
  r"""Rule that averages contiguous blocks of ``block_size`` entries on ``axis``.

  This is the paper's block size :math:`b` for dense and attention kernels:
  along ``axis``, entries :math:`[kb, (k+1)b)` are replaced by their mean. When
  :math:`b` does not divide the axis length :math:`n`, the last
  :math:`n \bmod b` entries form a smaller block of their own, averaged over
  its own entries (so every entry is a mean over at most :math:`b` values). A
  block larger than the axis is an error.

  Args:
    block_size: the block length :math:`b \ge 1`.
    axis: the axis along which blocks are formed (default: the last axis,
      which for a Flax ``Dense`` kernel ``(in, out)`` groups output units).

  Returns:
    A :class:`SpatialRule`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> rule = aho.block_mean(2)
    >>> print(rule.apply(jnp.array([1.0, 3.0, 5.0, 7.0, 9.0])))
    [2. 2. 6. 6. 9.]

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, 2021 (section 3.3).
  """
  if isinstance(block_size, bool) or not isinstance(block_size, int):
    raise TypeError(f"block_size must be an int, got {block_size!r}")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(f"axis must be an int, got {axis!r}")
  return BlockMean(block_size, axis)


def conv_window_mean() -> ConvWindowMean:
  r"""Rule for Flax/Keras convolution kernels ``(window..., in, out)``.

  A leaf of rank :math:`r \ge 3` is averaged over its first :math:`r - 2`
  axes, the kernel window of a 1-D, 2-D or 3-D convolution; leaves of rank 0
  to 2 (biases, norms, ``Dense`` kernels) are left as they are. This is the
  default of :func:`scale_by_adahessian`. Note that Flax ``DenseGeneral``
  kernels of rank 3, such as the ``(features, heads, head_dim)`` query kernels
  of ``MultiHeadDotProductAttention``, are averaged over their first axis too;
  give them an explicit rule (for example :func:`block_mean`) if that is not
  wanted. PyTorch's ``(out, in, kh, kw)`` layout needs
  ``mean_over_axes(2, 3)`` instead.

  Returns:
    A :class:`SpatialRule`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> kernel = jnp.arange(8.0).reshape(2, 2, 1, 2)  # (kh, kw, in, out)
    >>> print(aho.conv_window_mean().apply(kernel)[..., 0, :])
    [[[3. 4.]
      [3. 4.]]
    <BLANKLINE>
     [[3. 4.]
      [3. 4.]]]

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, 2021 (section 3.3).
  """
  return ConvWindowMean()


SpatialAveraging = Union[None, SpatialRule, Any, Callable[[Any], Any]]


def resolve_rules(spec: SpatialAveraging, params: Any) -> list[Optional[SpatialRule]]:
  """Returns one rule (or None) per leaf of `params`, checked against shapes.

  `spec` is None, a rule, a pytree prefix of rules (and None), or a function
  of params returning such a prefix.
  """
  if spec is None:
    return [None] * len(jax.tree.leaves(params))
  if isinstance(spec, SpatialRule):
    prefix = spec
  elif callable(spec):
    prefix = spec(params)
  else:
    prefix = spec

  is_rule_leaf = lambda x: x is None or isinstance(x, SpatialRule)
  try:
    per_leaf = jax.tree.map(
        lambda rule, sub: jax.tree.map(lambda _: rule, sub),
        prefix, params, is_leaf=is_rule_leaf)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "spatial_averaging does not match the params tree; give one rule, a "
        "pytree prefix of params with a rule or None at each node, or a "
        f"function params -> such a pytree. Details: {e}") from e

  # Not jax.tree.leaves(per_leaf, is_leaf=is_rule_leaf): that would also count
  # the None nodes of params (empty subtrees) as rules.
  rules = jax.tree.structure(params).flatten_up_to(per_leaf)
  for rule, (path, leaf) in zip(rules,
                                jax.tree_util.tree_leaves_with_path(params)):
    if rule is None:
      continue
    if not isinstance(rule, SpatialRule):
      raise TypeError(
          f"spatial_averaging for the leaf {_tree.path_str(path)} is "
          f"{type(rule).__name__}; expected a SpatialRule (mean_over_axes, "
          "block_mean, conv_window_mean) or None")
    if not _tree.is_differentiable(leaf):
      continue  # only floating-point leaves get an estimate to average
    rule.check(tuple(jnp.shape(leaf)), _tree.path_str(path))
  return rules
