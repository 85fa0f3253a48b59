"""Splitting a params pytree into its differentiable leaves and the rest."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def is_differentiable(leaf: Any) -> bool:
  """True for real floating-point array leaves."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    return False
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
        "complex parameters are not supported: the Hessian diagonal of a real "
        "loss in complex parameters is not defined by this estimator.")
  return jnp.issubdtype(dtype, jnp.floating)


class FloatLeaves(NamedTuple):
  """Positions of the floating-point leaves of a pytree."""

  treedef: Any
  index: tuple[int, ...]

  @classmethod
  def of(cls, tree: Any) -> "FloatLeaves":
    leaves, treedef = jax.tree.flatten(tree)
    index = tuple(i for i, x in enumerate(leaves) if is_differentiable(x))
    return cls(treedef, index)

  def select(self, tree: Any) -> list:
    """The floating-point leaves of `tree` (same structure as the original)."""
    leaves = self.treedef.flatten_up_to(tree)
    return [leaves[i] for i in self.index]

  def replace(self, tree: Any, values: list) -> Any:
    """`tree` with its floating-point leaves replaced by `values`."""
    leaves = list(self.treedef.flatten_up_to(tree))
    for i, v in zip(self.index, values):
      leaves[i] = v
    return self.treedef.unflatten(leaves)


def path_str(path: Any) -> str:
  """A key path as in error messages, e.g. "['conv']['kernel']"."""
  return jax.tree_util.keystr(path) or "<root>"


def at_least_float32(dtype: Any) -> Any:
  """`dtype` when it has 32 bits or more, else float32.

  Unlike `jnp.promote_types`, this does not depend on the dtype promotion mode
  (under "strict", bfloat16 and float32 have no promotion path).
  """
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def widen(leaves: list) -> list:
  """Each leaf in at least float32."""
  return [x.astype(at_least_float32(x.dtype)) for x in leaves]


def check_same_structure(params: Any, other: Any, other_name: str,
                         hint: str = "") -> None:
  """Raises a ValueError naming the mismatch when structures or shapes differ.

  Where a leaf of `params` is floating-point, the matching leaf of `other` must
  be floating-point too (a TypeError otherwise).
  """
  a = jax.tree.structure(params)
  b = jax.tree.structure(other)
  if a != b:
    raise ValueError(
        f"{other_name} and params must have the same pytree structure; "
        f"params: {short_treedef(a)}, {other_name}: {short_treedef(b)}{hint}")
  for (path, p), o in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(other)):
    where = path_str(path)
    if jnp.shape(p) != jnp.shape(o):
      raise ValueError(
          f"{other_name} and params differ in shape at {where}: params "
          f"{jnp.shape(p)}, {other_name} {jnp.shape(o)}{hint}")
    if is_differentiable(p) and not is_differentiable(o):
      raise TypeError(
          f"{other_name} at {where} has dtype {jnp.result_type(o)}, but the "
          f"parameter is floating-point ({jnp.result_type(p)}){hint}")


def short_treedef(treedef: Any, limit: int = 300) -> str:
  text = str(treedef)
  return text if len(text) <= limit else text[:limit] + "..."
