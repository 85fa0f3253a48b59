r"""The curvature of each leaf's diagonal block: trace and top eigenvalue."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_optax import _checks
from adahessian_optax import _docs
from adahessian_optax.algorithms import _common
from adahessian_optax.algorithms import _eigen
from adahessian_optax.algorithms import _trace
from adahessian_optax.operators import _base
from adahessian_optax.operators import _curvature


class LayerSummary(NamedTuple):
  r"""The curvature of each parameter leaf's diagonal block.

  Each attribute is a pytree like params, with a scalar at each float leaf
  the summary covers (zeros elsewhere).

  Attributes:
    size: :math:`n_i`, the leaf's number of entries.
    trace: :math:`\mathrm{tr}(A_i)`, estimated (Hutchinson).
    trace_stderr: its standard error.
    mean_trace: :math:`\mathrm{tr}(A_i) / n_i`, HAWQ-V2's sensitivity.
    mean_trace_stderr: its standard error.
    top_eigenvalue: :math:`\lambda_{\max}(A_i)` (Lanczos on the block).
  """

  size: Any
  trace: Any
  trace_stderr: Any
  mean_trace: Any
  mean_trace_stderr: Any
  top_eigenvalue: Any


@_docs.shared
def per_layer(op: _base.LinearOperator, key: Any, *, n_samples: int = 100,
              n_steps: int = 30, tol: float = 1e-3) -> LayerSummary:
  r"""Trace, trace per parameter and top eigenvalue of each leaf's block.

  For each leaf :math:`i` the operator acts on, with :math:`n_i` entries,
  its diagonal block :math:`A_i`:

  .. math::
    \mathrm{tr}(A_i) \approx \frac1S \sum_s \langle z_{s,i}, (A z_s)_i
    \rangle, \qquad \frac{\mathrm{tr}(A_i)}{n_i}, \qquad
    \lambda_{\max}(A_i),

  the per-layer numbers that HAWQ (V1: top eigenvalue, V2: average trace)
  and per-layer sharpness studies rank layers by. The traces come from one
  :func:`trace` (``n_samples`` products for all leaves together), the
  eigenvalues from one :func:`eigenpairs` per leaf on the operator
  restricted to it (:meth:`~LinearOperator.restrict`, at most ``n_steps``
  products each); the operator is not rebuilt.

  Args:
    <<op>>
    <<per_layer_settings>>

  Returns:
    A :class:`LayerSummary` of pytrees like params.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(jnp.arange(3.0) * p["b"] ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> s = aho.per_layer(aho.curvature_operator(loss, params), key=0,
    ...                   n_samples=4)
    >>> print(s.mean_trace["a"], s.mean_trace["b"], f"{s.top_eigenvalue['b']:.3f}")
    2.0 2.0 4.000

  References:
    Dong et al., `HAWQ-V2: Hessian Aware trace-Weighted Quantization of
    Neural Networks <https://arxiv.org/abs/1911.03852>`_, NeurIPS 2020.
  """
  _common.check_operator(op, "per_layer")
  if any(m is not None for m in op.mask):
    raise ValueError(
        "per_layer needs an operator on whole leaves (a summary is per "
        "leaf); restrict it with wrt= flags of whole leaves")
  key = _common.key_of(key, "per_layer")
  result = _trace.trace(op, key, n_samples=n_samples)
  space = op.space
  sizes, tops = [], []
  for position, (shape, _) in enumerate(space.shapes):
    n = int(np.prod(shape))
    flags = [False] * len(space.avals)
    flags[space.index[position]] = True
    block = op.restrict(space.treedef.unflatten(flags))
    top = _eigen.eigenpairs(block, key, k=1, tol=tol,
                            n_steps=min(n, n_steps)).values[0]
    sizes.append(n)
    tops.append(top)
  size = space.embed([jnp.asarray(n) for n in sizes], None)
  size = jax.tree.map(int, size)
  divide = lambda t, n: t / max(n, 1)
  return LayerSummary(
      size=size,
      trace=result.per_leaf,
      trace_stderr=result.per_leaf_stderr,
      mean_trace=jax.tree.map(divide, result.per_leaf, size),
      mean_trace_stderr=jax.tree.map(divide, result.per_leaf_stderr, size),
      top_eigenvalue=space.embed(tops, None))


@_docs.shared
def layer_summary(value_fn: Any, params: Any, key: Any, *,
                  n_samples: int = 100, n_steps: int = 30, tol: float = 1e-3,
                  wrt: Any = None,
                  axis_name: Optional[str] = None) -> LayerSummary:
  r"""Trace, trace per parameter and top eigenvalue of each leaf's block.

  :func:`per_layer` of ``curvature_operator(value_fn, params, wrt=wrt,
  axis_name=axis_name)``: the Hessian's (or the GGN's, for a :func:`ggn`)
  per-layer numbers that HAWQ and per-layer sharpness studies rank layers
  by.

  Args:
    <<value_fn>>
    params: the pytree at which to take the curvature.
    <<per_layer_settings>>
    wrt: which leaves to summarise (see :func:`hessian_trace`); whole
      leaves only.
    <<axis_name>>

  Returns:
    A :class:`LayerSummary` of pytrees like params.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(jnp.arange(3.0) * p["b"] ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> s = aho.layer_summary(loss, params, key=0, n_samples=4)
    >>> print(s.mean_trace["a"], s.mean_trace["b"], f"{s.top_eigenvalue['b']:.3f}")
    2.0 2.0 4.000
  """
  value_fn = _checks.check_value_fn(value_fn, None, "layer_summary")
  key = _common.key_of(key, "layer_summary")
  op = _curvature.curvature_operator(value_fn, params, wrt=wrt,
                                     axis_name=axis_name)
  return per_layer(op, key, n_samples=n_samples, n_steps=n_steps, tol=tol)
