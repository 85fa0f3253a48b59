"""Frozen dataclasses as pytrees: their arrays are children, the rest static.

The operators and curvature kinds hold arrays (params, residuals, labels)
beside functions and settings (a loss closure, a selection of leaves). As
pytrees whose arrays are the children and everything else is part of the
structure, they can be arguments and results of ``jax.jit``: a program is
compiled once per structure (the loss object, the settings, the shapes) and
takes the arrays as arguments.
"""

import dataclasses
from typing import Any

import jax
import numpy as np


def is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


class _Static:
  """A non-array leaf kept in the structure: equal when equal (or, when it
  cannot be hashed, when it is the same object)."""

  __slots__ = ("value", "_key")

  def __init__(self, value: Any):
    self.value = value
    try:
      hash(value)
      self._key = value
    except TypeError:
      self._key = _Identity(value)

  def __eq__(self, other):
    return (isinstance(other, _Static) and type(self.value) is type(other.value)
            and self._key == other._key)

  def __hash__(self):
    return hash((type(self.value), self._key))

  def __repr__(self):
    return f"static({self.value!r})"


class _Identity:
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __eq__(self, other):
    return isinstance(other, _Identity) and other.obj is self.obj

  def __hash__(self):
    return id(self.obj)


def partition(tree: Any) -> tuple[list, Any]:
  """`(arrays, structure)`: the array leaves of `tree` and the rest."""
  leaves, treedef = jax.tree.flatten(tree)
  arrays = [x for x in leaves if is_array(x)]
  statics = tuple(None if is_array(x) else _Static(x) for x in leaves)
  return arrays, (treedef, statics)


def combine(arrays: list, structure: Any) -> Any:
  """The inverse of :func:`partition`."""
  treedef, statics = structure
  it = iter(arrays)
  return treedef.unflatten(
      [next(it) if s is None else s.value for s in statics])


def dataclass(cls: type) -> type:
  """A frozen dataclass registered as a pytree (see the module docstring)."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  names = tuple(f.name for f in dataclasses.fields(cls))

  def flatten(obj):
    arrays, structures = [], []
    for name in names:
      a, s = partition(getattr(obj, name))
      arrays += a
      structures.append((s, len(a)))
    return arrays, tuple(structures)

  def unflatten(structures, arrays):
    obj, start = object.__new__(cls), 0
    for name, (structure, n) in zip(names, structures):
      object.__setattr__(obj, name,
                         combine(arrays[start:start + n], structure))
      start += n
    return obj

  jax.tree_util.register_pytree_node(cls, flatten, unflatten)
  return cls


@dataclass
class Box:
  """Any pytree, its non-array leaves (a Python int in the params, say)
  kept static when it crosses a ``jax.jit`` boundary."""

  value: Any
