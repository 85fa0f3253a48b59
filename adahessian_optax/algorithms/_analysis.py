r"""Hessian analysis: the trace, extreme eigenvalues and spectral density.

PyHessian's toolkit for JAX, built on Hessian-vector products. Each function
takes a loss closure ``params -> scalar`` or a :class:`DatasetLoss` (a loss
over batches) and builds an operator on the float leaves of the params:

* traced (inside ``jax.jit`` or another transformation): ``lax`` loops, and
  :func:`jax.linearize` of the gradient, so one primal pass and a tangent
  pass per product;
* concrete (called outside any transformation): one jitted primal pass
  per call (its residuals kept), then the whole algorithm, its loops
  traced, as one compiled program that takes the residuals (the closure
  traced afresh on each call, both programs reused while the trace is the
  same);
* a :class:`DatasetLoss`: Python loops around a jitted forward-over-reverse
  product per batch.

Vectors stay lists of leaves (see :mod:`adahessian_optax.algorithms._lanczos`): each
leaf keeps its sharding, and its dtype in the products; sums over leaves are
accumulated in at least float32.
"""

import collections
import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_optax import _checks
from adahessian_optax.operators import _curvature
from adahessian_optax.operators import _ggn
from adahessian_optax.algorithms import _lanczos
from adahessian_optax import _probes
from adahessian_optax import _tree
from adahessian_optax import _xla_cpu

_METHODS = ("hutchinson", "hutch++")
_WHICH = ("largest", "smallest")
_UNSET = object()


# ---------------------------------------------------------------------------
# A loss over a whole dataset.


def _leading_size(batch: Any) -> int:
  try:
    return int(_curvature.batch_size(batch))
  except ValueError as e:
    raise TypeError(
        f"DatasetLoss: cannot read the size of a batch ({e}); pass "
        "size_fn=<batch -> number of examples>") from None


def _in_dtypes_of(vector: list, leaves: list) -> list:
  return [v.astype(x.dtype) for v, x in zip(vector, leaves)]


def _restricted(value_fn: Any, params: Any, split: _tree.FloatLeaves) -> Any:
  """`value_fn` as a function of the leaves `split` selects (a list), the
  other leaves of `params` held fixed; GGNs and sub-batch losses keep their
  kind (`*batch` is passed on to a GGN's halves)."""
  if isinstance(value_fn, _ggn.GGN):
    return _ggn.GGN(
        lambda ls, *batch: value_fn.output_fn(split.replace(params, ls),
                                              *batch),
        value_fn.output_loss)
  if isinstance(value_fn, _curvature.SubBatchValueFn):
    return dataclasses.replace(
        value_fn,
        loss_fn=lambda ls, b: value_fn.loss_fn(split.replace(params, ls), b))
  return lambda ls, *batch: value_fn(split.replace(params, ls), *batch)


def _linearize(value_fn: Any, leaves: list, *batch: Any,
               axis_name: Optional[str] = None):
  """`(value, grad, product)` of a restricted loss: Hessian or GGN."""
  if isinstance(value_fn, _ggn.GGN):
    return _ggn.linearize(value_fn, leaves, *batch, axis_name=axis_name)
  if batch:
    plain = value_fn
    value_fn = lambda ls: plain(ls, *batch)
  return _curvature.linearize(value_fn, leaves, axis_name=axis_name)


def _accumulate_product(loss_fn, split, params, batch, tangent, total,
                        weight):
  """`total + weight * (curvature of the batch's loss) tangent`."""
  leaves = split.select(params)
  restricted = _restricted(loss_fn, params, split)
  hv = _product_of(_linearize(restricted, leaves, batch)[2], leaves, tangent)
  return [a + h * jnp.asarray(weight).astype(a.dtype)
          for a, h in zip(total, hv)]


def _batch_value(loss_fn, params, batch):
  return _curvature.scalar_loss(lambda p: loss_fn(p, batch), params)


# Keyed by the loss function: every DatasetLoss of one loss_fn shares them.
_batch_product_step = jax.jit(_accumulate_product, static_argnums=(0, 1))
_batch_value_step = jax.jit(_batch_value, static_argnums=0)


class DatasetLoss:
  r"""A loss averaged over a dataset given as batches, for the analysis tools.

  Pass it in place of the loss closure to :func:`hessian_trace`,
  :func:`hessian_eigenvalues` and :func:`hessian_spectrum`. With
  :math:`\ell_b` the mean loss over batch :math:`b` of :math:`n_b` examples
  and :math:`N = \sum_b n_b`, the loss and its Hessian are

  .. math::
    L(\theta) = \sum_b \frac{n_b}{N} \ell_b(\theta), \qquad
    H v = \sum_b \frac{n_b}{N} H_b v,

  so a smaller last batch gets its share, no more (averaging the batches
  with equal weights would not be the Hessian of the dataset's loss). Each
  product is one pass over the batches: a jitted per-batch Hessian-vector
  product added into one running sum, so memory does not grow with the
  number of batches. The product is compiled once per ``loss_fn`` and batch
  shape (a ragged last batch costs one more compile) and shared by every
  ``DatasetLoss`` of the same ``loss_fn`` object: define it once (not as a
  new lambda per call) to analyse repeatedly, for instance during training
  with the model's other state passed in the batch. As under ``jax.jit``,
  what ``loss_fn`` reads besides its arguments is fixed at that compile.

  Args:
    loss_fn: ``loss_fn(params, batch)``, the mean loss over one batch (a
      float scalar).
    batches: the batches, iterated once per Hessian-vector product: a
      re-iterable collection (a list, a tuple, a data loader whose
      ``__iter__`` starts over) or a function of no arguments returning a
      fresh iterator. A one-shot iterator or generator is refused. It must
      give the same batches on every pass.
    size_fn: ``size_fn(batch) -> int``, the number of examples in a batch;
      by default the leading dimension its array leaves share.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> x = jnp.arange(10.0)
    >>> loss_fn = lambda w, xb: jnp.mean(0.5 * (w * xb) ** 2)  # H = mean(x^2)
    >>> data = aho.DatasetLoss(loss_fn, [x[:4], x[4:8], x[8:]])
    >>> values, _, _ = aho.hessian_eigenvalues(data, jnp.ones(()), key=0)
    >>> print(values, jnp.mean(x ** 2))
    [28.5] 28.5
  """

  def __init__(self, loss_fn: Callable[[Any, Any], jax.Array],
               batches: Any, *, size_fn: Optional[Callable[[Any], int]] = None):
    if not callable(loss_fn):
      raise TypeError(
          "DatasetLoss: loss_fn must be a callable (params, batch) -> scalar "
          f"loss, got {type(loss_fn).__name__}")
    if not callable(batches):
      if not isinstance(batches, Iterable):
        raise TypeError(
            "DatasetLoss: batches must be a re-iterable collection of batches "
            "or a function returning a fresh iterator, got "
            f"{type(batches).__name__}")
      if isinstance(batches, Iterator):
        raise TypeError(
            "DatasetLoss: batches is a one-shot iterator, but every "
            "Hessian-vector product needs a full pass; pass a list, or a "
            "function returning a fresh iterator (e.g. lambda: make_batches())")
    if size_fn is not None and not callable(size_fn):
      raise TypeError("DatasetLoss: size_fn must be callable or None")
    self.loss_fn = loss_fn
    self.batches = batches
    self.size_fn = size_fn or _leading_size

  def iterate(self) -> Iterator:
    """A fresh iterator over the batches."""
    return iter(self.batches() if callable(self.batches) else self.batches)

  def _mean(self, step: Callable[[Any, int], Any], zero: Any) -> Any:
    total, count = zero, 0
    for batch in self.iterate():
      n = self.size_fn(batch)
      total = step(total, batch, n)
      count += n
    if count == 0:
      raise ValueError("DatasetLoss: the batches hold no examples")
    return total, count

  def __call__(self, params: Any) -> jax.Array:
    """The dataset's loss :math:`L(\\theta)` at `params`."""
    total, count = self._mean(
        lambda t, b, n: t + n * _batch_value_step(self.loss_fn, params, b),
        0.0)
    return total / count

  def _dataset_product(self, split: _tree.FloatLeaves, params: Any,
                       tangent: list) -> list:
    """The curvature times `tangent` on the leaves `split` selects (lists,
    at least float32): the Hessian's, or the GGN's for a :func:`ggn`."""
    total, count = self._mean(
        lambda t, b, n: _batch_product_step(self.loss_fn, split, params, b,
                                            tangent, t, n),
        [jnp.zeros_like(t) for t in tangent])
    return _lanczos.scale(total, 1.0 / count)


# ---------------------------------------------------------------------------
# The operator the algorithms see.


class _Operator(NamedTuple):
  """`matvec` on lists like `leaves` (at least f32), and how to loop.

  `split` picks the leaves of the params the operator acts on (those `wrt`
  selects); `mask` holds, per leaf, the 0/1 entries `wrt` keeps (None for
  all), and `dim` their number. `placement`, per leaf, the sharding its
  probes take when the params are concrete and on several devices (None:
  where XLA puts them).
  """

  matvec: Callable[[list], list]
  leaves: list
  split: _tree.FloatLeaves
  mask: list
  dim: int
  loops: _lanczos.Loops
  placement: Optional[tuple] = None


def _is_concrete(x: Any) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _selection(params: Any, wrt: Any, owner: str):
  """`(split, masks, dim)`: the float leaves `wrt` selects and their masks.

  `wrt` is None (everything), a pytree prefix of params whose leaves are
  bools or boolean arrays broadcastable to the leaves below them, or a
  function of params returning one (as optax's masks).
  """
  _checks.check_params(owner, params)
  everything = _tree.FloatLeaves.of(params)
  if not everything.index:
    raise ValueError(
        f"{owner}: params has no floating-point leaf, so there is no Hessian "
        "to analyse (integer, boolean and None leaves get no tangent)")
  if wrt is None:
    leaves = everything.select(params)
    return everything, [None] * len(leaves), _lanczos.dimension(leaves)
  if callable(wrt):
    wrt = wrt(params)
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), wrt,
                        params)
    flags = everything.treedef.flatten_up_to(full)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{owner}: wrt must be a pytree prefix of params (or a function of "
        f"params returning one) with bool leaves: {e}") from None
  index, masks, dim = [], [], 0
  leaves = jax.tree.leaves(params)
  for i in everything.index:
    flag, leaf = flags[i], leaves[i]
    if isinstance(flag, jax.core.Tracer):
      raise TypeError(
          f"{owner}: wrt must be concrete (it fixes the operator's "
          "dimension); it was traced. Build it from shapes, not values")
    mask = np.asarray(flag)
    if mask.dtype != bool:
      raise TypeError(
          f"{owner}: wrt's leaves must be bools or boolean arrays, got "
          f"{mask.dtype}")
    try:
      mask = np.broadcast_to(mask, np.shape(leaf))
    except ValueError:
      raise ValueError(
          f"{owner}: a wrt mask of shape {mask.shape} does not broadcast to "
          f"its leaf's shape {np.shape(leaf)}") from None
    count = int(mask.sum())
    if count == 0:
      continue
    index.append(i)
    masks.append(None if count == mask.size else mask)
    dim += count
  if not index:
    raise ValueError(f"{owner}: wrt selects no floating-point entry")
  return _tree.FloatLeaves(everything.treedef, tuple(index)), masks, dim


def _dimension(params: Any, owner: str, wrt: Any = None) -> int:
  return _selection(params, wrt, owner)[2]


def _jaxpr_linearized(jaxprs: tuple, consts: tuple, leaves: list) -> Any:
  """The product of a loss traced into `jaxprs` (their captured arrays
  `consts`), linearized: a Partial holding the residuals. One jaxpr is a
  loss of the leaves (its Hessian); two are a GGN's halves."""
  funs = [functools.partial(_ggn.eval_closed, j, c)
          for j, c in zip(jaxprs, consts)]
  if len(funs) == 2:
    return _ggn.linearize(_ggn.GGN(lambda ls: funs[0](*ls), funs[1]),
                          leaves)[2]
  return _curvature.linearize(lambda ls: funs[0](*ls), leaves)[2]


def _product_of(product: Any, leaves: list, v: list) -> list:
  """`product(v)` taken in the leaves' dtypes, returned in at least float32."""
  return _tree.widen(product(_in_dtypes_of(v, leaves)))


def _jittable(matvec: Any) -> bool:
  """Whether `matvec` is a Partial a jitted program can take as argument."""
  return isinstance(matvec, jax.tree_util.Partial)


# (leaf avals and shardings, jaxpr texts) -> jitted linearization, the
# newest _HOST_PROGRAMS: a closure made afresh for each call (a new lambda)
# finds the program of an earlier one that traced the same.
_HOST_PRODUCTS = collections.OrderedDict()
_HOST_PROGRAMS = 16


def _traced_halves(value_fn: Any, leaves: list) -> Any:
  """The loss of `leaves` (or a GGN's two halves) as closed jaxprs."""
  if isinstance(value_fn, _ggn.GGN):
    outputs = jax.make_jaxpr(value_fn.output_fn)(leaves)
    if len(outputs.out_avals) != 1:
      raise TypeError(
          "ggn: output_fn must return one array of outputs, got "
          f"{len(outputs.out_avals)}")
    aval = outputs.out_avals[0]
    loss = jax.make_jaxpr(value_fn.output_loss)(
        jax.ShapeDtypeStruct(aval.shape, aval.dtype))
    return outputs, loss
  return (jax.make_jaxpr(
      lambda ls: _curvature.scalar_loss(value_fn, ls))(leaves),)


def _host_closure(value_fn: Any, leaves: list) -> Any:
  """The product of a closure called outside any transformation, a Partial.

  One jitted primal pass (a linearization: of the gradient, or of a GGN's
  forward) keeps its residuals; the Partial holds them, and its structure
  holds the tangent pass's jaxpr, so :func:`_run` compiles the algorithm
  around it once per trace. The closure is traced afresh on every call
  (what it reads from Python enters as it is now); the arrays it captures
  are passed to the program, not embedded in it, and the compiled program
  is reused when the trace is the same as an earlier call's. None when the
  closure captures a tracer.
  """
  closed = _traced_halves(value_fn, leaves)
  consts = tuple(c.consts for c in closed)
  if any(isinstance(c, jax.core.Tracer) for cs in consts for c in cs):
    return None
  signature = (tuple((x.shape, x.dtype, x.sharding) for x in leaves),
               tuple(str(c.jaxpr) for c in closed))
  step = _HOST_PRODUCTS.pop(signature, None) or jax.jit(
      functools.partial(_jaxpr_linearized, tuple(c.jaxpr for c in closed)))
  _HOST_PRODUCTS[signature] = step  # newest last
  while len(_HOST_PRODUCTS) > _HOST_PROGRAMS:
    _HOST_PRODUCTS.popitem(last=False)
  return jax.tree_util.Partial(_product_of, step(consts, leaves), leaves)


@jax.jit
def _times(scale: list, v: list) -> list:
  return [x if s is None else x * s.astype(x.dtype) for s, x in zip(scale, v)]


def _scale_apply(matvec, scale, v):
  return _times(scale, matvec(_times(scale, v)))


def _scaled(matvec: Callable[[list], list], scale: list) -> Callable:
  """`v -> S matvec(S v)` for the diagonal `S` (None: the identity)."""
  if all(s is None for s in scale):
    return matvec
  if _jittable(matvec):
    return jax.tree_util.Partial(_scale_apply, matvec, scale)
  return functools.partial(_scale_apply, matvec, scale)


def _inverse_sqrt(preconditioner: Any, params: Any, split: _tree.FloatLeaves,
                  owner: str) -> list:
  """`P^-1/2` at the selected leaves, in at least float32."""
  try:
    values = split.select(preconditioner)
  except (ValueError, TypeError) as e:
    # The same leaves in other containers (an nnx.Optimizer's state holds
    # OptVariable where the params hold Param): matched by position.
    leaves = jax.tree.leaves(preconditioner)
    if len(leaves) != split.treedef.num_leaves:
      raise ValueError(
          f"{owner}: preconditioner must be a pytree like params (a positive "
          f"diagonal P per leaf): {e}") from None
    values = [leaves[i] for i in split.index]
  out = []
  for p, x in zip(values, split.select(params)):
    if _is_concrete(p) and not np.all(np.asarray(p) > 0):
      raise ValueError(
          f"{owner}: the preconditioner must be positive (P^-1/2 is taken); "
          "add the optimizer's eps")
    p = jnp.asarray(p)
    if jnp.shape(p) != jnp.shape(x):
      raise ValueError(
          f"{owner}: a preconditioner leaf of shape {jnp.shape(p)} does not "
          f"match its parameter's shape {jnp.shape(x)}")
    p = p.astype(_tree.at_least_float32(p.dtype))
    out.append(jax.lax.rsqrt(p))
  return out


def _operator(value_fn: Any, params: Any, key: jax.Array,
              axis_name: Optional[str], owner: str, wrt: Any = None,
              preconditioner: Any = None) -> _Operator:
  split, mask, dim = _selection(params, wrt, owner)
  # NumPy leaves are concrete too: placed as JAX arrays, like jit would.
  leaves = [jnp.asarray(x) if isinstance(x, np.ndarray) else x
            for x in split.select(params)]
  _check_auto_sharded(leaves, owner)
  mask = [None if m is None else jnp.asarray(m, _tree.at_least_float32(
      x.dtype)) for m, x in zip(mask, leaves)]
  scale = mask
  if preconditioner is not None:
    scale = [r if s is None else r * s for s, r in zip(
        scale, _inverse_sqrt(preconditioner, params, split, owner))]
  concrete = _is_concrete(key) and all(_is_concrete(x) for x in leaves)
  if isinstance(value_fn, DatasetLoss):
    if axis_name is not None:
      raise ValueError(
          f"{owner}: axis_name applies to a loss closure; a DatasetLoss "
          "already sums over all of its batches")
    if not concrete:
      raise TypeError(
          f"{owner}: a DatasetLoss loops over its batches in Python, so it "
          "cannot run under jax.jit or another transformation; call it on "
          "concrete params (each batch's product is jitted already)")
    matvec = functools.partial(value_fn._dataset_product, split, params)
    return _Operator(_scaled(matvec, scale), leaves, split, mask, dim,
                     _lanczos.HOST, _placement(leaves))
  value_fn = _checks.check_value_fn(value_fn, None, owner)
  restricted = _restricted(value_fn, params, split)
  # A SubBatchValueFn's products are its head's: the curvature core's.
  if (concrete and axis_name is None
      and not isinstance(value_fn, _curvature.SubBatchValueFn)):
    matvec = _host_closure(restricted, leaves)
    if matvec is not None:
      return _Operator(_scaled(matvec, scale), leaves, split, mask, dim,
                       _lanczos.HOST, _placement(leaves))
  product = functools.partial(
      _xla_cpu.call, _linearize(restricted, leaves, axis_name=axis_name)[2])

  def matvec(v):
    return _curvature.axis_mean(_product_of(product, leaves, v), axis_name)

  return _Operator(_scaled(matvec, scale), leaves, split, mask, dim,
                   _lanczos.TRACED)


def _run(op: _Operator, algorithm: Callable, *args: Any, **static: Any):
  """`algorithm(op, *args, **static)`, for a closure called outside jit as
  one compiled program.

  Such a closure's product is a Partial of its primal pass's residuals
  (:func:`_host_closure`): the algorithm then runs with its loops traced,
  in one program that takes the Partial, cached by the product's jaxpr
  (in the Partial's structure), the shapes and `static` (hashable). A
  Python loop of per-step programs would pay a dispatch and a host sync a
  step, several times a small model's product.
  """
  if op.loops is _lanczos.HOST and _jittable(op.matvec):
    return _program(op.matvec, op.leaves, op.mask, args, algorithm=algorithm,
                    split=op.split, dim=op.dim, placement=op.placement,
                    static=tuple(sorted(static.items())))
  return algorithm(op, *args, **static)


@functools.partial(jax.jit, static_argnames=("algorithm", "split", "dim",
                                             "placement", "static"))
def _program(matvec, leaves, mask, args, *, algorithm, split, dim, placement,
             static):
  # The convolutions of the product in the layout XLA:CPU runs fast inside
  # loops (see _xla_cpu).
  op = _Operator(functools.partial(_xla_cpu.call, matvec), leaves, split,
                 mask, dim, _lanczos.TRACED, placement)
  return algorithm(op, *args, **dict(static))


def _negate_apply(matvec, v):
  return _lanczos.scale(matvec(v), -1)


def _negated(op: _Operator) -> _Operator:
  if _jittable(op.matvec):
    return op._replace(matvec=jax.tree_util.Partial(_negate_apply, op.matvec))
  return op._replace(matvec=functools.partial(_negate_apply, op.matvec))


@functools.partial(jax.jit, static_argnames=("distribution",))
def _next_probe(key: jax.Array, leaves: list, distribution: str):
  key, probe_key = _probes.split(key)
  z = _probes.SAMPLERS[distribution](probe_key, leaves, 1)[0]
  return key, _tree.widen(z)


def _draw(op: _Operator, key: jax.Array, distribution: str = "rademacher"):
  """`(key, probe)`: one step of the probe sequence.

  The trace, the spectrum and the eigenvalues draw their probes from this
  one sequence, so with the same key the `s`-th Hutchinson probe is the
  start of the `s`-th Lanczos run. For concrete params each probe is
  placed like its parameter (under the caller's jit, XLA propagates the
  params' shardings).
  """
  key, z = _next_probe(key, op.leaves, distribution)
  z = _masked(op, z)
  if op.placement is not None:
    z = [jax.device_put(v, s)
         for v, s in zip(z, op.placement)]
  return key, z


def _check_auto_sharded(leaves: list, owner: str):
  """Leaves sharded over a mesh's explicit axes are refused by name."""
  for x in leaves:
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if spec is not None and any(p is not None for p in spec):
      raise NotImplementedError(
          f"{owner}: a leaf of shape {x.shape} is sharded over explicit mesh "
          f"axes ({spec}), which the analysis does not support yet: build "
          "the mesh with automatic axes, jax.make_mesh(shape, names, "
          "axis_types=(AxisType.Auto,) * len(names))")


def _placement(leaves: list) -> Optional[tuple]:
  """The leaves' shardings, when concrete and some on several devices."""
  if all(_is_concrete(x) for x in leaves) and any(
      len(x.sharding.device_set) > 1 for x in leaves):
    return tuple(x.sharding for x in leaves)
  return None


def _masked(op: _Operator, v: list) -> list:
  """`v` with the entries `wrt` leaves out set to zero."""
  return v if all(m is None for m in op.mask) else _times(op.mask, v)


def _check_steps(name: str, value: Any, low: int, dim: int, hint: str):
  _checks.check_positive_int(name, value, allow_traced=False)
  if not low <= value <= dim:
    raise ValueError(
        f"{name} must lie in [{low}, {dim}] ({hint}; the operator acts on "
        f"{dim} floating-point entries), got {value}")


def _renamed(owner: str, old: str, new: str, old_value: Any, new_value: Any,
             default: Any) -> Any:
  """`new_value`, or `old_value` given under the 0.3 name (with a warning)."""
  if old_value is _UNSET:
    return new_value
  if new_value != default:
    raise TypeError(f"{owner}: got both {old}= and {new}=; pass {new}= only")
  warnings.warn(
      f"{owner}: {old}= is deprecated, use {new}= (the same meaning; the 0.3 "
      "name goes in 0.6)", DeprecationWarning, stacklevel=3)
  return old_value


def _check_finite(op: _Operator, owner: str, result: jax.Array) -> None:
  """Outside jit, a non-finite result is an error (under jit it stays NaN)."""
  if op.loops is _lanczos.HOST and not bool(jnp.all(jnp.isfinite(result))):
    raise ValueError(
        f"{owner}: the Hessian-vector products are not finite at these "
        "params (a NaN or inf in the params, the loss or its derivatives)")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ---------------------------------------------------------------------------
# Trace.


class HessianTrace(NamedTuple):
  r"""A stochastic estimate of the trace of the Hessian.

  Attributes:
    estimate: the estimate of :math:`\mathrm{tr}(H)`, the mean of `samples`.
    stderr: its standard error, the sample standard deviation of `samples`
      over the square root of their number (NaN for a single sample).
    per_leaf: a pytree like params: at each floating-point leaf the estimate
      of the trace of that leaf's diagonal block of :math:`H` (the
      per-layer trace); zeros at the other leaves. They sum to `estimate`.
    per_leaf_stderr: the standard errors of `per_leaf`, likewise.
    samples: the independent samples whose mean is `estimate`, shape
      ``(n,)``: :math:`z_s^\top H z_s` for Hutchinson (``n = n_samples``);
      for Hutch++, :math:`\mathrm{tr}(Q^\top H Q) + g_s^\top (I - QQ^\top)
      H (I - QQ^\top) g_s` (``n = n_samples - 2 (n_samples // 3)``).
  """

  estimate: jax.Array
  stderr: jax.Array
  per_leaf: Any
  per_leaf_stderr: Any
  samples: jax.Array


def _hutchinson(op: _Operator, key: jax.Array, n: int, distribution: str):
  """Per-leaf samples `<z_l, (Hz)_l>`, shape `(n, leaves)`."""
  def one(key):
    key, z = _draw(op, key, distribution)
    return key, _lanczos.leaf_dots(z, op.matvec(z))

  return op.loops.scan(one, key, n)[1]


@jax.jit
def _append_orthonormal(q: list, j: Any, y: list) -> list:
  """`q` with row `j` set to `y` orthonormalised against it (or zero)."""
  y_norm = _lanczos.norm(y)
  y, _ = _lanczos.orthogonalize(q, y)
  r = _lanczos.norm(y)
  # A column numerically in the span of the others (a low-rank H) is dropped.
  keep = r > 100 * jnp.finfo(r.dtype).eps * y_norm
  y = _lanczos.scale(y, jnp.where(keep, 1 / jnp.where(keep, r, 1), 0))
  return [v.at[j].set(x) for v, x in zip(q, y)]


def _hutch_plus_plus(op: _Operator, key: jax.Array, n: int,
                     distribution: str):
  """`(exact, samples)`: per-leaf `tr(Q^T H Q)` and residual samples.

  Meyer, Musco, Musco and Woodruff's Hutch++ with `n` products: a third
  sketch the range, `Q = orth(H S)`; a third give `tr(Q^T H Q)` exactly; the
  rest are Hutchinson probes of the deflated `(I - P) H (I - P)`.
  """
  r = n // 3
  q = [_lanczos.stacked_zeros(x, r) for x in _tree.widen(op.leaves)]

  def sketch(j, carry):
    key, q = carry
    key, s = _draw(op, key, distribution)
    return key, _append_orthonormal(q, j, op.matvec(s))

  key, q = op.loops.fori_loop(0, r, sketch, (key, q))

  def exact(j, total):
    v = _lanczos.row(q, j)
    return total + _lanczos.leaf_dots(v, op.matvec(v))

  exact_part = op.loops.fori_loop(
      0, r, exact, jnp.zeros(len(op.leaves),
                             _lanczos.accumulation_dtype(q)))

  def residual(key):
    key, g = _draw(op, key, distribution)
    u, _ = _lanczos.orthogonalize(q, g)
    return key, _lanczos.leaf_dots(u, op.matvec(u))

  return exact_part, op.loops.scan(residual, key, n - 2 * r)[1]


def _stderr(samples: jax.Array) -> jax.Array:
  n = samples.shape[0]
  if n < 2:
    return jnp.full(samples.shape[1:], jnp.nan, samples.dtype)
  return jnp.std(samples, axis=0, ddof=1) / math.sqrt(n)


@jax.jit
def _summary(exact: jax.Array, samples: jax.Array):
  """`(estimate, stderr, per-leaf list, per-leaf stderr list, totals)`."""
  per_leaf = exact + jnp.mean(samples, axis=0)
  totals = jnp.sum(exact) + jnp.sum(samples, axis=1)
  return (jnp.sum(per_leaf), _stderr(totals), list(per_leaf),
          list(_stderr(samples)), totals)


def _per_leaf_tree(op: _Operator, params: Any, values: list) -> Any:
  zeros = jax.tree.map(lambda x: jnp.zeros((), values[0].dtype), params)
  return op.split.replace(zeros, values)


def hessian_trace(
    value_fn: Any,
    params: Any,
    key: Any,
    *,
    n_samples: int = 100,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    wrt: Any = None,
    preconditioner: Any = None,
    axis_name: Optional[str] = None,
) -> HessianTrace:
  r"""Estimates the trace of the Hessian, in all and per leaf.

  Hutchinson: for probes :math:`z_s` with independent entries of mean 0 and
  variance 1,

  .. math::
    \widehat{\mathrm{tr}}(H) = \frac1S \sum_{s=1}^S z_s^\top H z_s, \qquad
    \mathrm{Var}(z^\top H z) = \begin{cases}
      2\,(\|H\|_F^2 - \sum_i H_{ii}^2) & \text{Rademacher,} \\
      2\,\|H\|_F^2 & \text{Gaussian,} \end{cases}

  so the error falls as :math:`1/\sqrt{S}`. Hutch++ (``method="hutch++"``)
  spends the same :math:`S` products differently: :math:`S/3` sketch the
  dominant range :math:`Q = \mathrm{orth}(H\,[s_1 \dots s_{S/3}])`,
  :math:`S/3` compute :math:`\mathrm{tr}(Q^\top H Q)` exactly, and the rest
  estimate the trace of the deflated :math:`(I - QQ^\top) H (I - QQ^\top)`
  with Hutchinson; for a positive semi-definite :math:`H` its error falls as
  :math:`1/S`. Its estimate is unbiased given :math:`Q`, so the sample
  standard error of the deflated part is its standard error.

  The trace of leaf :math:`l`'s diagonal block is estimated from the same
  products, :math:`\frac1S \sum_s \langle z_{s,l}, (H z_s)_l \rangle` (for
  Hutch++ the exact part's and the deflated probes' per-leaf terms): the
  per-layer sharpness users compare.

  Each product costs a tangent pass (after one primal pass per call) or,
  for a :class:`DatasetLoss`, a pass over the data.

  Args:
    value_fn: the loss, ``params -> scalar``, or a :class:`DatasetLoss`.
    params: the pytree at which to take the Hessian. Only its
      floating-point leaves are differentiated.
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: the number of Hessian-vector products (at least 3 for
      Hutch++).
    method: ``"hutchinson"`` or ``"hutch++"``. Hutch++ holds its sketch,
      ``n_samples // 3`` vectors the size of the float params (in at least
      float32); Hutchinson holds none.
    distribution: ``"rademacher"`` (the smallest variance) or
      ``"gaussian"``.
    wrt: which parameters the operator acts on: None (all), a pytree prefix
      of params with bool leaves, or boolean arrays broadcastable to the
      leaves below them (to pick one layer of a stacked leaf), or a
      function of params returning one, as optax's masks. The operator is
      then the diagonal block of the selected entries.
    preconditioner: a positive diagonal :math:`P`, a pytree like params
      (e.g. from :func:`adam_preconditioner`): analyse
      :math:`P^{-1/2} H P^{-1/2}`, which has the eigenvalues of
      :math:`P^{-1} H`, instead of :math:`H`.
    axis_name: inside ``pmap``/``shard_map``, the data-parallel axis over
      which the Hessian-vector products are averaged (the replicas share
      the key).

  Returns:
    A :class:`HessianTrace` (``estimate``, ``stderr``, ``per_leaf``,
    ``per_leaf_stderr``, ``samples``), in at least float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(p["a"] ** 2) + 3 * jnp.sum(p["b"] ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> result = aho.hessian_trace(loss, params, key=0, n_samples=10)
    >>> print(result.estimate, result.stderr)   # exact: H is diagonal
    22.0 0.0
    >>> print(result.per_leaf["a"], result.per_leaf["b"])
    4.0 18.0

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines
    <https://doi.org/10.1080/03610918908812806>`_, 1989.

    Meyer, Musco, Musco and Woodruff, `Hutch++: Optimal Stochastic Trace
    Estimation <https://arxiv.org/abs/2010.09649>`_, SOSA 2021.
  """
  owner = "hessian_trace"
  _check_choice("method", method, _METHODS)
  _probes.check_distribution(distribution)
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  if method == "hutch++" and n_samples < 3:
    raise ValueError(
        f"hutch++ needs n_samples >= 3 (a third each for the sketch, its "
        f"trace and the residual), got {n_samples}")
  key = _probes.key_data(key, owner)
  op = _operator(value_fn, params, key, axis_name, owner, wrt, preconditioner)
  if method == "hutchinson":
    samples = _run(op, _hutchinson, key, n=n_samples,
                   distribution=distribution)
    exact = jnp.zeros(samples.shape[1], samples.dtype)
  else:
    exact, samples = _run(op, _hutch_plus_plus, key, n=n_samples,
                          distribution=distribution)
  estimate, stderr, per_leaf, per_leaf_stderr, totals = _summary(exact,
                                                                 samples)
  _check_finite(op, owner, estimate)
  return HessianTrace(
      estimate=estimate,
      stderr=stderr,
      per_leaf=_per_leaf_tree(op, params, per_leaf),
      per_leaf_stderr=_per_leaf_tree(op, params, per_leaf_stderr),
      samples=totals)


# ---------------------------------------------------------------------------
# Extreme eigenvalues.


class LanczosInfo(NamedTuple):
  r"""How the Lanczos run of :func:`hessian_eigenvalues` ended.

  Attributes:
    residuals: :math:`\|H y_j - \theta_j y_j\|` for each returned pair,
      shape ``(k,)``; a true eigenvalue lies within it of :math:`\theta_j`.
    n_steps: the Lanczos steps taken, each one Hessian-vector product.
    converged: whether every residual is at most ``tol`` times its own
      :math:`|\theta_j|` (plus a rounding-level floor, 100 machine epsilons
      of the largest :math:`|\theta|`); false when ``n_steps`` ran out
      first.
  """

  residuals: jax.Array
  n_steps: jax.Array
  converged: jax.Array


class Eigenpairs(NamedTuple):
  """Eigenvalues and eigenvectors from :func:`hessian_eigenvalues`.

  Attributes:
    values: the eigenvalues, shape ``(k,)`` in at least float32, descending
      (``which="largest"``) or ascending (``"smallest"``).
    vectors: the unit eigenvectors, a pytree like params whose leaves have a
      leading axis of size ``k``, each in its leaf's dtype (zeros at
      non-float leaves and where ``wrt`` leaves out); pass them back as
      ``init=`` to warm-start the next call.
    info: a :class:`LanczosInfo`: residuals, steps taken, convergence.
  """

  values: jax.Array
  vectors: Any
  info: LanczosInfo


def _stacked_like(op: _Operator, params: Any, vectors: list, k: int) -> Any:
  zeros = jax.tree.map(
      lambda x: jnp.zeros((k,) + jnp.shape(x), jnp.result_type(x)), params)
  return op.split.replace(zeros, _in_dtypes_of(vectors, op.leaves))


@jax.jit
def _start_near(warm: list, probe: list) -> list:
  """`warm / |warm| + probe / (100 |probe|)`."""
  return [w / _lanczos.norm(warm) + z / (100 * _lanczos.norm(probe))
          for w, z in zip(_tree.widen(warm), probe)]


def _warm_start(op: _Operator, init: Any, owner: str) -> list:
  """The start vector from earlier eigenvectors: their sum, masked."""
  try:
    stacked = op.split.select(init)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{owner}: init must be the vectors of an earlier call (a pytree like "
        f"params, a leading axis per vector): {e}") from None
  v0 = []
  for v, x in zip(stacked, op.leaves):
    v = jnp.asarray(v)
    if v.shape[1:] != x.shape:
      raise ValueError(
          f"{owner}: an init leaf of shape {v.shape} does not match its "
          f"parameter's shape {x.shape} with a leading vector axis")
    v0.append(jnp.sum(_tree.widen([v])[0], axis=0))
  return _masked(op, v0)


def _top_pairs(op: _Operator, v0: list, n_steps: int, k: int, tol: float):
  """`(theta, vectors, residuals, steps, converged)` of a Lanczos run from
  `v0` until the `k` largest pairs meet `tol`."""
  state, n, done = _lanczos.lanczos_until_converged(
      op.matvec, v0, n_steps, k, tol, op.loops, dim=op.dim)
  return (*_lanczos.top_pairs(state, n, k), n, done)


def hessian_eigenvalues(
    value_fn: Any,
    params: Any,
    key: Any,
    *,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-4,
    n_steps: Optional[int] = None,
    init: Any = None,
    wrt: Any = None,
    preconditioner: Any = None,
    axis_name: Optional[str] = None,
    max_steps: Any = _UNSET,
    return_info: Any = _UNSET,
) -> Eigenpairs:
  r"""The `k` largest (or most negative) eigenvalues of the Hessian.

  Lanczos with full reorthogonalisation from a normalised Rademacher vector
  :math:`v_1`: after :math:`m` steps, :math:`H V_m = V_m T_m + \beta_m
  v_{m+1} e_m^\top` with :math:`V_m` orthonormal and :math:`T_m`
  tridiagonal, one Hessian-vector product per step. The Ritz pairs
  :math:`(\theta_j, y_j = V_m s_j)`, from :math:`T_m s_j = \theta_j s_j`,
  have residuals

  .. math::
    \|H y_j - \theta_j y_j\| = |\beta_m\, s_{m,j}|,

  read off without another product. Steps continue until the `k` wanted
  pairs have residuals at most ``tol`` times their own :math:`|\theta_j|`
  (with a floor at rounding level), or ``n_steps``; each eigenvalue is
  then within its residual of a true one (and usually within
  residual\ :sup:`2`/gap). Unlike power iteration (PyHessian), which finds
  the largest :math:`|\lambda|`, this gives the largest algebraic
  eigenvalues, or with ``which="smallest"`` the most negative ones
  (Lanczos on :math:`-H`). A single-vector Krylov method sees one copy of
  an exactly repeated eigenvalue until the Krylov space is exhausted.

  The Lanczos basis holds ``n_steps + 1`` vectors the size of the float
  params (in at least float32): lower ``n_steps`` for large models.

  **During training**, pass the previous call's ``vectors`` as ``init``:
  Lanczos then starts from their sum (plus a hundredth of a random probe,
  so that a new top direction orthogonal to them is still found) and,
  while the top eigenvectors move little between calls, converges in a few
  products. Under ``jax.jit`` the run is a ``lax.while_loop``, so it can sit
  inside a training step (on XLA:CPU convolutions run slowly in loops: see
  the analysis guide). With ``preconditioner`` :math:`P` it gives the
  preconditioned sharpness :math:`\lambda_{\max}(P^{-1/2} H P^{-1/2})`
  that governs the stability of adaptive methods (:func:`adam_preconditioner`,
  :func:`adahessian_preconditioner`).

  Args:
    value_fn: the loss, ``params -> scalar``, or a :class:`DatasetLoss`.
    params: the pytree at which to take the Hessian.
    key: an int seed or a JAX PRNG key for the start vector.
    k: how many eigenvalues, 1 to the number of float entries.
    which: ``"largest"`` or ``"smallest"``.
    tol: the residual tolerance, relative to :math:`\|H\|_2`.
    n_steps: the most Lanczos steps, each one product (default
      ``min(dimension, max(100, 3 k))``), from ``k`` to the dimension.
    init: the ``vectors`` of an earlier call (a warm start), or None for a
      Rademacher start.
    wrt: which parameters the operator acts on: None (all), a pytree prefix
      of params with bool leaves, or boolean arrays broadcastable to the
      leaves below them (to pick one layer of a stacked leaf), or a
      function of params returning one, as optax's masks. The operator is
      then the diagonal block of the selected entries.
    preconditioner: a positive diagonal :math:`P`, a pytree like params
      (e.g. from :func:`adam_preconditioner`): analyse
      :math:`P^{-1/2} H P^{-1/2}`, which has the eigenvalues of
      :math:`P^{-1} H`, instead of :math:`H`.
    axis_name: inside ``pmap``/``shard_map``, the data-parallel axis over
      which the products are averaged (the replicas share the key).
    max_steps: deprecated name of ``n_steps`` (0.3).
    return_info: deprecated and ignored: the info is always returned (0.3
      returned it only when asked, changing the number of values).

  Returns:
    An :class:`Eigenpairs` ``(values, vectors, info)``. A jitted function
    cannot raise on a value: check ``info.converged`` to know that the
    tolerance was met.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> H = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    >>> loss = lambda p: 0.5 * p @ H @ p
    >>> values, vectors, info = aho.hessian_eigenvalues(loss, jnp.zeros(3),
    ...                                                 key=0, k=2)
    >>> print(jnp.round(values, 4), vectors.shape, bool(info.converged))
    [4.7321 3.    ] (2, 3) True
    >>> print(jnp.round(jnp.linalg.eigvalsh(H)[::-1][:2], 4))
    [4.7321 3.    ]

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators
    <https://doi.org/10.6028/jres.045.026>`_, 1950.

    Golub and Van Loan, Matrix Computations, 4th ed., section 10.1.
  """
  owner = "hessian_eigenvalues"
  _check_choice("which", which, _WHICH)
  _checks.check_interval("tol", tol, 0.0, 1.0, low_open=True, high_open=True)
  n_steps = _renamed(owner, "max_steps", "n_steps", max_steps, n_steps, None)
  if return_info is not _UNSET:
    warnings.warn(
        f"{owner}: return_info= is deprecated and ignored; the result is "
        "always Eigenpairs(values, vectors, info)", DeprecationWarning,
        stacklevel=2)
  key = _probes.key_data(key, owner)
  dim = _dimension(params, owner, wrt)
  _check_steps("k", k, 1, dim, "the number of eigenvalues")
  if n_steps is None:
    n_steps = min(dim, max(100, 3 * k))
  _check_steps("n_steps", n_steps, k, dim, "at least k")
  op = _operator(value_fn, params, key, axis_name, owner, wrt, preconditioner)
  if which == "smallest":
    op = _negated(op)
  _, v0 = _draw(op, key)
  if init is not None:
    v0 = _start_near(_warm_start(op, init, owner), v0)
  theta, vectors, residuals, n, done = _run(op, _top_pairs, v0,
                                            n_steps=n_steps, k=k, tol=tol)
  _check_finite(op, owner, theta)
  values = -theta if which == "smallest" else theta
  return Eigenpairs(values, _stacked_like(op, params, vectors, k),
                    LanczosInfo(residuals, n, done))


# ---------------------------------------------------------------------------
# Spectral density.


class SpectralDensity(NamedTuple):
  r"""The eigenvalue density of the Hessian as Gauss quadratures, one a probe.

  Probe :math:`p` gives nodes :math:`\theta_{p,k}` and weights
  :math:`w_{p,k}` with :math:`\sum_k w_{p,k} = 1`; the density estimate is

  .. math::
    \hat\phi(x) = \frac1P \sum_{p=1}^P \sum_{k=1}^m w_{p,k}\,
    \mathcal N(x;\ \theta_{p,k},\ \sigma^2),

  an estimate of :math:`\frac1n \sum_i \mathcal N(x; \lambda_i, \sigma^2)`
  (integral 1; multiply by the number of parameters for counts).

  Attributes:
    nodes: Ritz values, shape ``(n_samples, n_steps)``, ascending per
      probe.
    weights: squared first components of the eigenvectors of each probe's
      tridiagonal matrix, shape ``(n_samples, n_steps)``.
  """

  nodes: jax.Array
  weights: jax.Array

  def density(self, grid: Any, sigma: Any) -> jax.Array:
    r"""The Gaussian-smoothed density :math:`\hat\phi` at the points `grid`.

    Args:
      grid: points :math:`x`, any shape.
      sigma: the standard deviation of each Gaussian (> 0).

    Returns:
      :math:`\hat\phi(x)`, shaped like `grid`.
    """
    _checks.check_interval("sigma", sigma, 0.0, np.inf, low_open=True)
    grid = jnp.asarray(grid, self.nodes.dtype)
    sigma = jnp.asarray(sigma, self.nodes.dtype)
    z = (grid[..., None, None] - self.nodes) / sigma
    gauss = jnp.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    return jnp.sum(self.weights * gauss, axis=(-2, -1)) / self.nodes.shape[0]

  def plot(self, ax: Any = None, *, sigma: Optional[float] = None,
           num_points: int = 1000, log: bool = True, **plot_kwargs) -> Any:
    """Plots the density with matplotlib (imported here, only when used).

    Args:
      ax: the matplotlib axes (default: a new figure's).
      sigma: the Gaussian width; default 1% of the range of the nodes.
      num_points: grid points, spanning the nodes and 5 sigma beyond.
      log: a logarithmic density axis (the outliers of a network's
        spectrum are many decades less dense than its bulk).
      **plot_kwargs: passed to ``ax.plot`` (e.g. ``label``).

    Returns:
      The axes.
    """
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    nodes = np.asarray(self.nodes, np.float64)
    low, high = nodes.min(), nodes.max()
    if sigma is None:
      sigma = 0.01 * (high - low) or 0.01 * max(abs(high), 1.0)
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    density = np.asarray(self.density(grid, sigma), np.float64)
    if ax is None:
      ax = plt.figure().gca()
    ax.plot(grid, density, **plot_kwargs)
    if log:
      ax.set_yscale("log")
      ax.set_ylim(bottom=density.max() * 1e-8)
    ax.set(xlabel="eigenvalue", ylabel="density")
    return ax


def _quadratures(op: _Operator, key: jax.Array, n_samples: int,
                 n_steps: int):
  """`(nodes, weights)` of `n_samples` Lanczos runs of `n_steps` steps, each
  from the next probe."""
  def one(key):
    key, v0 = _draw(op, key)
    state = _lanczos.lanczos(op.matvec, v0, n_steps, op.loops)
    return key, _lanczos.quadrature(state)

  return op.loops.scan(one, key, n_samples)[1]


def hessian_spectrum(
    value_fn: Any,
    params: Any,
    key: Any,
    *,
    n_samples: int = 10,
    n_steps: int = 50,
    wrt: Any = None,
    preconditioner: Any = None,
    axis_name: Optional[str] = None,
    num_probes: Any = _UNSET,
    num_steps: Any = _UNSET,
) -> SpectralDensity:
  r"""The eigenvalue spectral density of the Hessian, by Lanczos quadrature.

  Stochastic Lanczos quadrature (SLQ): for each of `n_samples` Rademacher
  probes :math:`z`, `n_steps` steps of Lanczos with full
  reorthogonalisation from :math:`v = z / \|z\|` give a tridiagonal
  :math:`T = S \Theta S^\top`; its eigenvalues are the nodes and
  :math:`w_k = S_{1k}^2` the weights of the Gauss quadrature of the spectral
  measure of :math:`v`:

  .. math::
    \sum_k w_k\, \theta_k^j = v^\top H^j v \quad (j \le 2m - 1), \qquad
    \sum_k w_k = 1,

  so :math:`n \sum_k w_k \theta_k = z^\top H z` is the Hutchinson sample of
  the same probe (the :math:`s`-th probe of :func:`hessian_trace` with the
  same key) and :math:`\mathbb E\, v^\top f(H) v = \mathrm{tr} f(H) / n`.
  Costs ``n_samples * n_steps`` products; memory ``n_steps + 1``
  vectors the size of the float params, whatever ``n_samples``.

  Args:
    value_fn: the loss, ``params -> scalar``, or a :class:`DatasetLoss`.
    params: the pytree at which to take the Hessian.
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: the number of probes (independent Lanczos runs).
    n_steps: Lanczos steps per probe, at most the dimension.
    wrt: which parameters the operator acts on: None (all), a pytree prefix
      of params with bool leaves, or boolean arrays broadcastable to the
      leaves below them (to pick one layer of a stacked leaf), or a
      function of params returning one, as optax's masks. The operator is
      then the diagonal block of the selected entries.
    preconditioner: a positive diagonal :math:`P`, a pytree like params
      (e.g. from :func:`adam_preconditioner`): analyse
      :math:`P^{-1/2} H P^{-1/2}`, which has the eigenvalues of
      :math:`P^{-1} H`, instead of :math:`H`.
    axis_name: inside ``pmap``/``shard_map``, the data-parallel axis over
      which the products are averaged.
    num_probes: deprecated name of ``n_samples`` (0.3).
    num_steps: deprecated name of ``n_steps`` (0.3).

  Returns:
    A :class:`SpectralDensity` with ``nodes`` and ``weights`` of shape
    ``(n_samples, n_steps)``; ``.density(grid, sigma)`` smooths it and
    ``.plot()`` draws it.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> H = jnp.diag(jnp.array([1.0, 2.0, 2.0, 5.0]))
    >>> loss = lambda p: 0.5 * p @ H @ p
    >>> esd = aho.hessian_spectrum(loss, jnp.zeros(4), key=0, n_samples=2,
    ...                            n_steps=3)
    >>> print(jnp.round(esd.nodes, 3))   # the distinct eigenvalues
    [[1. 2. 5.]
     [1. 2. 5.]]
    >>> print(jnp.round(esd.weights, 3))   # their shares of the spectrum
    [[0.25 0.5  0.25]
     [0.25 0.5  0.25]]

  References:
    Golub and Meurant, Matrices, Moments and Quadrature with Applications,
    2010.

    Ghorbani, Krishnan and Xiao, `An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density
    <https://arxiv.org/abs/1901.10159>`_, ICML 2019.
  """
  owner = "hessian_spectrum"
  n_samples = _renamed(owner, "num_probes", "n_samples", num_probes,
                       n_samples, 10)
  n_steps = _renamed(owner, "num_steps", "n_steps", num_steps, n_steps, 50)
  key = _probes.key_data(key, owner)
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  _check_steps("n_steps", n_steps, 1, _dimension(params, owner, wrt),
               "Lanczos steps per probe")
  op = _operator(value_fn, params, key, axis_name, owner, wrt, preconditioner)
  nodes, weights = _run(op, _quadratures, key, n_samples=n_samples,
                        n_steps=n_steps)
  _check_finite(op, owner, nodes)
  return SpectralDensity(nodes, weights)


# ---------------------------------------------------------------------------
# Per-layer summary.


class LayerSummary(NamedTuple):
  r"""The curvature of each parameter leaf's diagonal block.

  Each attribute is a pytree like params, with a scalar at each float leaf
  the summary covers (zeros elsewhere).

  Attributes:
    size: :math:`n_i`, the leaf's number of entries.
    trace: :math:`\mathrm{tr}(H_i)`, estimated (Hutchinson).
    trace_stderr: its standard error.
    mean_trace: :math:`\mathrm{tr}(H_i) / n_i`, HAWQ-V2's sensitivity.
    mean_trace_stderr: its standard error.
    top_eigenvalue: :math:`\lambda_{\max}(H_i)` (Lanczos on the block).
  """

  size: Any
  trace: Any
  trace_stderr: Any
  mean_trace: Any
  mean_trace_stderr: Any
  top_eigenvalue: Any


def layer_summary(
    value_fn: Any,
    params: Any,
    key: Any,
    *,
    n_samples: int = 100,
    n_steps: int = 30,
    tol: float = 1e-3,
    wrt: Any = None,
    axis_name: Optional[str] = None,
) -> LayerSummary:
  r"""Trace, trace per parameter and top eigenvalue of each leaf's block.

  For each float leaf :math:`i` with :math:`n_i` entries, the diagonal
  block :math:`H_i` of the Hessian (or of the GGN, for a :func:`ggn`):

  .. math::
    \mathrm{tr}(H_i) \approx \frac1S \sum_s \langle z_{s,i}, (H z_s)_i
    \rangle, \qquad \frac{\mathrm{tr}(H_i)}{n_i}, \qquad
    \lambda_{\max}(H_i),

  the per-layer numbers that HAWQ (V1: top eigenvalue, V2: average trace)
  and per-layer sharpness studies rank layers by. The traces come from one
  :func:`hessian_trace` (``n_samples`` products for all leaves together),
  the eigenvalues from one :func:`hessian_eigenvalues` per leaf
  (``wrt=`` that leaf, at most ``n_steps`` products each).

  Args:
    value_fn: the loss, ``params -> scalar``, a :func:`ggn`, or a
      :class:`DatasetLoss`.
    params: the pytree at which to take the curvature.
    key: an int seed or a JAX PRNG key.
    n_samples: Hutchinson probes for the traces.
    n_steps: the most Lanczos steps per leaf (fewer for a smaller leaf).
    tol: the Lanczos tolerance, relative.
    wrt: which leaves to summarise (see :func:`hessian_trace`); whole
      leaves only.
    axis_name: the data-parallel axis, as in :func:`hessian_trace`.

  Returns:
    A :class:`LayerSummary` of pytrees like params.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(jnp.arange(3.0) * p["b"] ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> s = aho.layer_summary(loss, params, key=0, n_samples=4)
    >>> print(s.mean_trace["a"], s.mean_trace["b"], s.top_eigenvalue["b"])
    2.0 2.0 4.0

  References:
    Dong et al., `HAWQ-V2: Hessian Aware trace-Weighted Quantization of
    Neural Networks <https://arxiv.org/abs/1911.03852>`_, NeurIPS 2020.
  """
  owner = "layer_summary"
  key = _probes.key_data(key, owner)
  split, mask, _ = _selection(params, wrt, owner)
  if any(m is not None for m in mask):
    raise ValueError(
        f"{owner}: wrt must select whole leaves here (a summary is per leaf)")
  trace = hessian_trace(value_fn, params, key, n_samples=n_samples, wrt=wrt,
                        axis_name=axis_name)
  flat, treedef = jax.tree.flatten(params)
  sizes = [0] * len(flat)
  tops = [jnp.zeros((), trace.estimate.dtype)] * len(flat)
  for i in split.index:
    only = treedef.unflatten([j == i for j in range(len(flat))])
    n = int(np.prod(np.shape(flat[i])))
    values = hessian_eigenvalues(
        value_fn, params, key, k=1, tol=tol, n_steps=min(n, n_steps),
        wrt=only, axis_name=axis_name).values
    sizes[i], tops[i] = n, values[0]
  size = treedef.unflatten(sizes)
  divide = lambda t, n: t / max(n, 1)
  return LayerSummary(
      size=size,
      trace=trace.per_leaf,
      trace_stderr=trace.per_leaf_stderr,
      mean_trace=jax.tree.map(divide, trace.per_leaf, size),
      mean_trace_stderr=jax.tree.map(divide, trace.per_leaf_stderr, size),
      top_eigenvalue=treedef.unflatten(tops))
