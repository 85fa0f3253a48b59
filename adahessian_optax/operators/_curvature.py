r"""Curvature kinds, and the operator built from one at a point.

A *curvature kind* says how a loss's curvature is multiplied: the Hessian of
a loss closure (:class:`Hessian`, the default for a plain closure), the
generalized Gauss-Newton matrix (:func:`~adahessian_optax.ggn`), the
empirical Fisher (:func:`~adahessian_optax.empirical_fisher`), a sub-batch's
Hessian (:func:`~adahessian_optax.sub_batch_value_fn`), a finite-difference
product (:func:`~adahessian_optax.finite_difference`). Each implements one
verb, :meth:`Curvature.linearize`: at the params, the value, the gradient
and the product as a :class:`jax.tree_util.Partial` of the primal pass's
residuals. The estimators also use :meth:`Curvature.products` (the value,
the gradient and a few products in one pass). A new kind subclasses
:class:`Curvature`; nothing else changes.

:func:`curvature_operator` builds the :class:`~adahessian_optax.LinearOperator`
of a kind at the params: the primal pass runs once, each product is a
tangent pass.
"""

import contextlib
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _checks
from adahessian_optax import _docs
from adahessian_optax import _programs
from adahessian_optax import _pytree
from adahessian_optax import _tree
from adahessian_optax import _xla_cpu
from adahessian_optax.operators import _base


def scalar_loss(value_fn: Callable[..., Any], params: Any,
                *batch: Any) -> jax.Array:
  """`value_fn(params, *batch)`, checked to be a real floating-point scalar."""
  out = _checks.call_value_fn(value_fn, params, *batch)
  if isinstance(out, (tuple, list, dict)):
    raise TypeError(
        "value_fn must return a scalar loss, got a "
        f"{type(out).__name__}; for a loss with auxiliary outputs pass "
        "`lambda p: loss(p)[0]`.")
  shape = jnp.shape(out)
  if shape != ():
    raise ValueError(f"value_fn must return a scalar loss, got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
    raise TypeError(
        "value_fn must return a floating-point loss, got dtype "
        f"{jnp.result_type(out)}")
  return out


def axis_mean(tree: Any, axis_name: Optional[str]) -> Any:
  """`tree` averaged over the named axis (the identity for None)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def value_and_grad_of_leaves(value_fn: Callable[..., Any], params: Any,
                             space: _base.Space, batch: tuple,
                             axis_name: Optional[str]):
  """`leaves -> (value, grad leaves)` of `value_fn` as a function of the
  leaves of `space`, the others held fixed; and those leaves."""

  def loss_of_leaves(leaves):
    value = scalar_loss(value_fn, space.replace(params, leaves), *batch)
    if axis_name is None:
      return value
    # Differentiate the axis mean: under shard_map's default check_vma=True,
    # autodiff already sums the gradient of a per-shard loss with respect to
    # replicated params (n times the mean); pmean makes it the mean. Under
    # pmap, `axis_mean` afterwards does it instead.
    return jax.lax.pmean(value, axis_name)

  return jax.value_and_grad(loss_of_leaves), space.select(params)


_FORWARD_MODE_FAILURES = ("forward-mode autodiff", "Linearization failed")
_KERNEL_WAYS_OUT = (
    "the curvature product needs forward-mode differentiation of the loss "
    "(jax.jvp / jax.linearize), which it cannot have: the model calls a "
    "kernel with a custom VJP and no forward-mode rule (flash attention: "
    "Pallas, cuDNN, splash). Ways out: (a) give the curvature a closure that "
    "uses the reference implementation (e.g. XLA attention) while the "
    "gradient uses the kernel; (b) aho.finite_difference(loss) takes "
    "products from differences of gradients; (c) aho.gnb_estimator needs "
    "gradients only")


@contextlib.contextmanager
def forward_mode():
  """Names the cause and the ways out when forward-mode autodiff fails.

  Kernels with a custom VJP and no forward-mode rule (Pallas and cuDNN
  flash attention, TPU splash attention) support ``jax.grad`` but not
  ``jax.jvp`` or ``jax.linearize``, which a Hessian-, GGN- or Fisher-vector
  product needs. JAX raises a TypeError or a ValueError at once, or (from
  some kernels) a bare AssertionError; or it stages a ``custom_lin`` that
  fails only when the program is compiled, which :func:`checked_call`
  catches while tracing.
  """
  try:
    yield
  except (TypeError, ValueError, AssertionError) as e:
    text = str(e)
    if isinstance(e, AssertionError) and text.strip():
      raise
    if text and not any(word in text for word in _FORWARD_MODE_FAILURES):
      raise
    raise TypeError(f"{_KERNEL_WAYS_OUT}. JAX said: {type(e).__name__}: "
                    f"{text or '(no message)'}") from e


def _stages_custom_lin(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "custom_lin":
      return True
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and _stages_custom_lin(inner):
          return True
  return False


def _refuse_custom_lin(jaxpr) -> None:
  if _stages_custom_lin(jaxpr):
    raise TypeError(_KERNEL_WAYS_OUT)


def checked_call(fn: Callable[..., Any], *args: Any,
                 rewrite: bool = False) -> Any:
  """`fn(*args)`, traced first: forward mode applied to a custom-VJP kernel
  (a staged ``custom_lin``) is an error that says so, at trace time. With
  `rewrite`, the convolutions in XLA:CPU's loop layout (see _xla_cpu)."""
  with forward_mode():
    return _xla_cpu.call(fn, *args, inspect=_refuse_custom_lin,
                         rewrite=rewrite)


class Curvature:
  """Base class of the curvature kinds (see the module docstring).

  A subclass is a :func:`dataclasses.dataclass`-like pytree (arrays as
  children, functions and settings static) that implements ``__call__``
  (the loss) and :meth:`linearize`.
  """

  def __call__(self, params: Any, *batch: Any) -> jax.Array:
    raise NotImplementedError

  def linearize(self, params: Any, space: _base.Space, *batch: Any,
                axis_name: Optional[str] = None):
    """`(value, grad, product)` at `params`, for the leaves of `space`.

    ``grad`` is a list like those leaves; ``product`` a
    :class:`jax.tree_util.Partial` mapping such a list (in the leaves'
    dtypes) to the curvature times it. The value and the gradient are
    averaged over ``axis_name``; the products are not.
    """
    raise NotImplementedError

  def products(self, params: Any, space: _base.Space, tangents: list,
               combine: Callable[[list, list], Any], *,
               axis_name: Optional[str] = None):
    """`(value, grad, combine(tangents, [C t for t in tangents]))`.

    `combine` must be linear in the products. By default one
    :meth:`linearize` and a product per tangent.
    """
    def compute(params, tangents):
      value, grad, product = self.linearize(params, space,
                                            axis_name=axis_name)
      return value, grad, combine(tangents, [product(t) for t in tangents])
    return checked_call(compute, params, tangents)

  def operator(self, params: Any, space: _base.Space, batch: tuple,
               axis_name: Optional[str]) -> _base.LinearOperator:
    """The operator at `params`: the primal pass once (one compiled program
    per definition when called on concrete arrays)."""
    if _programs.is_traced((self, params, batch)):
      return _linearized(self, _pytree.Box(params), batch, space=space,
                         axis_name=axis_name)
    return _programs.call(_linearized, (self, _pytree.Box(params), batch),
                          space=space, axis_name=axis_name)

  def accumulate(self, step: Callable[..., Any], total: Any) -> tuple:
    """`(step(total, self, (), 1), 1)`: the data as batches of examples,
    weighted by their sizes; a closure is one batch of its own."""
    return step(total, self, (), 1), 1


def _linearized(kind, params, batch, *, space, axis_name):
  value, grad, product = kind.linearize(params.value, space, *batch,
                                        axis_name=axis_name)
  return CurvatureOperator(product, value, grad, space, axis_name)


@_pytree.dataclass
class CurvatureOperator(_base.LinearOperator):
  """A curvature kind linearized at the params (see :func:`curvature_operator`).

  Attributes:
    product: the product, a :class:`jax.tree_util.Partial` holding the
      primal pass's residuals.
    value: the loss at the params.
    grad: its gradient at the leaves acted on (a list).
    space: the leaves acted on.
    axis_name: the named axis the products are averaged over, or None.
  """

  product: Any
  value: Any
  grad: list
  space: _base.Space
  axis_name: Optional[str] = None

  def apply(self, vector: list) -> list:
    dtypes = [dtype for _, dtype in self.space.shapes]
    # On XLA:CPU, the product's convolutions in the layout that runs fast
    # inside the algorithms' loops (see _xla_cpu).
    out = checked_call(self.product,
                       [x.astype(d) for x, d in zip(vector, dtypes)],
                       rewrite=True)
    return axis_mean(_tree.widen(out), self.axis_name)


@_pytree.dataclass
class Hessian(Curvature):
  """The Hessian of a loss closure ``loss_fn(params, *batch) -> scalar``:
  forward-over-reverse products (the default kind of a plain closure)."""

  loss_fn: Callable[..., Any]

  def __call__(self, params, *batch):
    return self.loss_fn(params, *batch)

  def linearize(self, params, space, *batch, axis_name=None):
    value_and_grad, leaves = value_and_grad_of_leaves(
        self.loss_fn, params, space, batch, axis_name)
    with forward_mode():
      (value, grad), tangent_map = jax.linearize(value_and_grad, leaves)
    return value, grad, jax.tree_util.Partial(_second, tangent_map)

  def products(self, params, space, tangents, combine, *, axis_name=None):
    return checked_call(functools.partial(
        self._products, space=space, combine=combine, axis_name=axis_name),
                        params, tangents)

  def _products(self, params, tangents, *, space, combine, axis_name):
    value_and_grad, leaves = value_and_grad_of_leaves(
        self.loss_fn, params, space, (), axis_name)
    with forward_mode():
      if len(tangents) == 1:
        (value, grad), (_, hv) = jax.jvp(value_and_grad, (leaves,),
                                         (tangents[0],))
        return value, grad, combine(tangents, [hv])
      # One primal pass, then a tangent pass per product: on XLA:CPU this
      # beat vmapping the tangents (batched tangents got slow layouts: 1.3x
      # for 8).
      (value, grad), tangent_map = jax.linearize(value_and_grad, leaves)
      return value, grad, combine(tangents,
                                  [tangent_map(t)[1] for t in tangents])


def _second(tangent_map, v):
  return tangent_map(v)[1]


def as_curvature(loss: Any) -> Curvature:
  """`loss` as a curvature kind: a plain closure is its Hessian."""
  return loss if isinstance(loss, Curvature) else Hessian(loss)


@_docs.shared
def curvature_operator(loss: Any, params: Any, *, batch: Any = None,
                       wrt: Any = None, preconditioner: Any = None,
                       axis_name: Optional[str] = None
                       ) -> _base.LinearOperator:
  r"""The curvature of a loss at the params, as a linear operator.

  Built once: the primal pass (forward and backward) runs here and its
  residuals are kept, so each product is one tangent pass
  (:func:`jax.linearize`). The operator is a pytree: build it inside
  ``jax.jit`` (its products then trace into your program) or outside (its
  primal pass and every algorithm run on it are compiled once per
  definition: the loss object, the selection, the settings and the shapes,
  as ``jax.jit`` compiles once per function; define the loss once and pass
  the data as ``batch`` to analyse repeatedly without recompiling).

  The kind of curvature comes from ``loss``: a plain closure gives the
  Hessian; :func:`~adahessian_optax.ggn`, :func:`~adahessian_optax.empirical_fisher`,
  :func:`~adahessian_optax.finite_difference` and
  :func:`~adahessian_optax.sub_batch_value_fn` their own; a
  :class:`~adahessian_optax.DatasetLoss` the mean over its batches (its
  products loop over the data in Python, so it cannot be built under jit).

  Args:
    loss: ``params -> scalar`` (``(params, batch) -> scalar`` with
      ``batch``), a curvature kind, or a :class:`~adahessian_optax.DatasetLoss`.
    params: the pytree at which to take the curvature. Only its
      floating-point leaves are acted on.
    batch: passed to the loss as its second argument, or None. As an
      argument (not captured by the closure) it changes without a new
      compile.
    <<wrt>>
    <<preconditioner>>
    <<axis_name>>

  Returns:
    A :class:`~adahessian_optax.LinearOperator`: ``matvec(v)`` on pytrees
    like the params, ``size``, ``restrict(wrt)``, ``precondition(P)``; pass
    it to :func:`~adahessian_optax.eigenpairs`,
    :func:`~adahessian_optax.trace`, :func:`~adahessian_optax.spectral_density`
    or :func:`~adahessian_optax.per_layer`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> H = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    >>> op = aho.curvature_operator(lambda w: 0.5 * w @ H @ w, jnp.ones(2))
    >>> print(op.size, op.matvec(jnp.array([1.0, 0.0])))
    2 [2. 1.]
  """
  _checks.check_params("curvature_operator", params)
  if not callable(loss):
    raise TypeError(
        "value_fn must be a callable params -> scalar loss, got "
        f"{type(loss).__name__}")
  source = as_curvature(loss)
  everything = _base.Space.of(params)
  if not everything.index:
    raise ValueError(
        "params has no floating-point leaf, so there is no curvature to "
        "analyse (integer, boolean and None leaves get no tangent)")
  positions, masks = _base.selection(everything, wrt, params)
  index = tuple(everything.index[i] for i in positions)
  space = _base.Space.of(params, index)
  _check_auto_sharded(space, params)
  op = source.operator(params, space, () if batch is None else (batch,),
                       axis_name)
  if preconditioner is None and all(m is None for m in masks):
    return op
  inverse = None if preconditioner is None else _base.inverse_sqrt(
      preconditioner, space)
  return _base._block(op, tuple(range(len(index))), masks, inverse)  # pylint: disable=protected-access


def _check_auto_sharded(space: _base.Space, params: Any):
  """Leaves sharded over a mesh's explicit axes are refused by name."""
  for x in space.select(params):
    if not hasattr(x, "shape") or isinstance(x, (int, float)):
      continue
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if spec is not None and any(p is not None for p in spec):
      raise NotImplementedError(
          f"a leaf of shape {x.shape} is sharded over explicit mesh axes "
          f"({spec}), which the analysis does not support yet: build the "
          "mesh with automatic axes, jax.make_mesh(shape, names, "
          "axis_types=(AxisType.Auto,) * len(names))")
