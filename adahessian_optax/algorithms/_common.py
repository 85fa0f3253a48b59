"""What the algorithms share: the probe sequence and argument checks."""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from adahessian_optax import _checks
from adahessian_optax import _programs
from adahessian_optax import _probes
from adahessian_optax import _tree
from adahessian_optax.operators import _base


@functools.partial(jax.jit, static_argnames=("shapes", "distribution"))
def next_probe(key: jax.Array, shapes: tuple, distribution: str):
  """`(key, probe)`: one step of the probe sequence, leaves of `shapes`."""
  key, probe_key = _probes.split(key)
  like = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  z = _probes.SAMPLERS[distribution](probe_key, like, 1)[0]
  return key, _tree.widen(z)


def draw(op: _base.LinearOperator, key: jax.Array,
         distribution: str = "rademacher"):
  """`(key, probe)`, the probe masked to the operator's entries.

  The trace, the spectrum and the eigenvalues draw their probes from this
  one sequence, so with the same key the `s`-th Hutchinson probe is the
  start of the `s`-th Lanczos run. For concrete params on several devices
  each probe is placed like its parameter (under the caller's jit, XLA
  propagates the params' shardings).
  """
  key, z = next_probe(key, tuple(op.space.shapes), distribution)
  return key, place(op, _base.mask_vector(op, z))


def place(op: _base.LinearOperator, v: list) -> list:
  """`v` placed like the operator's probes (its params' shardings), when
  they are known (concrete params on several devices)."""
  if op.space.placement is None:
    return v
  return [jax.device_put(x, s) for x, s in zip(v, op.space.placement)]


def _apply(op, v):
  return op.apply(v)


def product(op: _base.LinearOperator):
  """`v -> A v`, the result placed like the probes (so every vector of an
  algorithm has its parameter's sharding); compiled once when an algorithm
  loops in Python around a traceable product."""
  apply = op.apply
  if op.traceable and not _programs.is_traced(op):
    apply = lambda v: _programs.call(_apply, (op, v))
  if op.space.placement is None:
    return apply
  return lambda v: place(op, apply(v))


def zeros(op: _base.LinearOperator) -> list:
  """Zeros shaped like the operator's leaves (at least float32), placed like
  its probes."""
  return place(op, [jnp.zeros(shape, _tree.at_least_float32(dtype))
                    for shape, dtype in op.space.shapes])


def check_steps(name: str, value: Any, low: int, dim: int, hint: str):
  _checks.check_positive_int(name, value, allow_traced=False)
  if not low <= value <= dim:
    raise ValueError(
        f"{name} must lie in [{low}, {dim}] ({hint}; the operator acts on "
        f"{dim} floating-point entries), got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_operator(op: Any, owner: str) -> None:
  if not isinstance(op, _base.LinearOperator):
    raise TypeError(
        f"{owner} takes a LinearOperator (aho.curvature_operator(loss, "
        "params) or aho.linear_operator(matvec, like)), got "
        f"{type(op).__name__}; for a loss closure call the hessian_* "
        "function instead")


def check_finite(result: jax.Array, what: str = "products") -> None:
  """Outside jit, a non-finite result is an error (under jit it stays NaN)."""
  if isinstance(result, jax.core.Tracer):
    return
  if not bool(jnp.all(jnp.isfinite(result))):
    raise ValueError(
        f"the operator's {what} are not finite at these params (a NaN or inf "
        "in the params, the loss or its derivatives)")


def in_dtypes(space: _base.Space, vectors: list) -> list:
  return [v.astype(dtype) for v, (_, dtype) in zip(vectors, space.shapes)]


def key_of(key: Any, owner: str) -> jax.Array:
  return _probes.key_data(key, owner)
