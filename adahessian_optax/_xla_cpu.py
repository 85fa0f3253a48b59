"""Convolutions in the layout XLA:CPU runs fast inside loops and branches.

At the top level of a program XLA:CPU rewrites every convolution to the
layout its fast kernel takes (``NHWC`` input, ``HWIO`` kernel, ``NHWC``
output, with transposes around it). Inside the body of a ``while``, ``scan``
or ``cond`` it does not, and the convolutions of a backward pass (whose
dimension numbers JAX's transpose rules permute) run as generic loops,
about 17x slower for a small CNN (``PAPER_NOTES.md`` section 10, JAX issue
12868). :func:`call` traces a function and evaluates its trace with every
convolution written in that layout by explicit transposes, so that the
loops of the analysis tools run at the speed of top-level code.
"""

from typing import Any, Callable, Optional

import jax
from jax.extend import core as jax_core
import numpy as np

_CONV = jax.lax.conv_general_dilated_p
# Primitives that call a jaxpr once: evaluated inline (their convolutions
# then sit in the caller's trace).
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def _canonical_numbers(ndim: int) -> jax.lax.ConvDimensionNumbers:
  """(batch, spatial..., feature), (spatial..., in, out), like the input."""
  spatial = tuple(range(1, ndim - 1))
  return jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, ndim - 1, *spatial),
      rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
      out_spec=(0, ndim - 1, *spatial))


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
  numbers = dimension_numbers
  canonical = _canonical_numbers(lhs.ndim)
  if numbers == canonical:
    return _CONV.bind(lhs, rhs, dimension_numbers=numbers, **params)
  lhs_spec, rhs_spec, out_spec = numbers
  lhs = jax.lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs = jax.lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  out = _CONV.bind(lhs, rhs, dimension_numbers=canonical, **params)
  order = (out_spec[0], *out_spec[2:], out_spec[1])
  return jax.lax.transpose(out, tuple(int(i) for i in np.argsort(order)))


def _subjaxprs(params: dict) -> list:
  found = []
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, jax_core.Jaxpr):
        found.append(v)
  return found


def convolutions(jaxpr: jax_core.Jaxpr, within: tuple = ()) -> list:
  """`(names of the enclosing primitives, dimension numbers)` of every
  convolution in `jaxpr`, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive is _CONV:
      found.append((within, eqn.params["dimension_numbers"]))
    for sub in _subjaxprs(eqn.params):
      found += convolutions(sub, within + (eqn.primitive.name,))
  return found


def _has_conv(jaxpr: jax_core.Jaxpr) -> bool:
  return bool(convolutions(jaxpr))


def _rewritten(closed: jax_core.ClosedJaxpr) -> Any:
  """`closed` with canonical convolutions, or None if that changes its type."""
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
           for a in closed.in_avals]
  new = jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, *a))(
      *avals)
  if new.consts or new.out_avals != closed.out_avals:
    return None
  return new


def _with_rewritten_params(params: dict) -> Any:
  """`params` with each jaxpr that holds a convolution rewritten (None when
  one cannot be: the equation is then left as it is)."""
  out = dict(params)
  for name, value in params.items():
    many = isinstance(value, (tuple, list))
    items = list(value) if many else [value]
    if not any(isinstance(v, jax_core.ClosedJaxpr) and _has_conv(v.jaxpr)
               for v in items):
      continue
    new = [_rewritten(v) if isinstance(v, jax_core.ClosedJaxpr)
           and _has_conv(v.jaxpr) else v for v in items]
    if any(v is None for v in new):
      return None
    out[name] = type(value)(new) if many else new[0]
  return out


def _bind(eqn, values: list) -> list:
  if eqn.primitive is _CONV:
    return [_canonical_conv(*values, **eqn.params)]
  inner = _subjaxprs(eqn.params)
  params = eqn.params
  if any(_has_conv(j) for j in inner):
    if eqn.primitive.name in _CALLS and len(inner) >= 1:
      called = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if isinstance(called, jax_core.ClosedJaxpr):
        return _eval(called.jaxpr, called.consts, *values)
      if isinstance(called, jax_core.Jaxpr) and not called.constvars:
        return _eval(called, (), *values)
    params = _with_rewritten_params(eqn.params) or eqn.params
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _eval(jaxpr: jax_core.Jaxpr, consts, *args) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    for v, x in zip(eqn.outvars, _bind(eqn, [read(v) for v in eqn.invars])):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def call(fn: Callable[..., Any], *args: Any,
         inspect: Optional[Callable[[Any], None]] = None,
         rewrite: bool = True) -> Any:
  """`fn(*args)`, its convolutions in XLA:CPU's fast layout on a CPU backend.

  Elsewhere (GPU, TPU), when the trace holds no convolution, or without
  `rewrite`, this is `fn(*args)` itself. `inspect`, if given, is called on
  the trace's jaxpr first (on every backend), to refuse what it holds.
  """
  rewrite = rewrite and jax.default_backend() == "cpu"
  if not rewrite and inspect is None:
    return fn(*args)
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
  if inspect is not None:
    inspect(closed.jaxpr)
  leaves = jax.tree.leaves(args)
  if rewrite and _has_conv(closed.jaxpr):
    out = _eval(closed.jaxpr, closed.consts, *leaves)
  else:
    out = jax_core.jaxpr_as_fun(closed)(*leaves)
  return jax.tree.unflatten(jax.tree.structure(shapes), out)
