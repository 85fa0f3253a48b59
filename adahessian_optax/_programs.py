"""The compiled programs of calls made outside any transformation.

One cache, keyed by the function, its static settings and the structure of
its pytree arguments: for an operator or a curvature kind, that structure is
its definition (the loss object, the selection, the settings; see
:mod:`adahessian_optax._pytree`), so a program compiled for one operator
serves every operator of the same definition, such as the same loss at new
params or on a new batch. Like ``jax.jit``, a program is traced once: what a
loss closure reads besides its arguments (a global, an attribute) is fixed at
that trace. The newest :data:`SIZE` programs are kept, so that the arrays a
loss closure captures are released with its programs.
"""

import collections
import functools
from typing import Any, Callable

import jax

SIZE = 32
_CACHE: "collections.OrderedDict[Any, Callable]" = collections.OrderedDict()


def call(fn: Callable, args: tuple, **static: Any) -> Any:
  """`jax.jit(fn)(*args, **static)` with `static` as static arguments."""
  settings = tuple(sorted(static.items()))
  key = (fn, settings, jax.tree.structure(args))
  program = _CACHE.pop(key, None)
  if program is None:
    program = jax.jit(functools.partial(fn, **static))
  _CACHE[key] = program  # newest last
  while len(_CACHE) > SIZE:
    _CACHE.popitem(last=False)
  return program(*args)


def is_traced(tree: Any) -> bool:
  """Whether any leaf of `tree` is a tracer (a transformation is running)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))
