r"""The operator contract: a symmetric linear map on a params pytree.

A :class:`LinearOperator` acts on the floating-point leaves of a params
pytree (its :class:`Space`). The algorithms see it through three members:

* ``apply(vector)``: the product on a *list* of leaves, one array per leaf
  of the space, each in at least float32 (a vector is never raveled, so
  every leaf keeps its sharding and its dtype in the product);
* ``mask``: per leaf, ``None`` or the 0/1 entries the operator acts on
  (a restriction to part of a leaf), and ``size``, their number;
* ``traceable``: whether ``apply`` can be traced (``lax`` loops, one
  compiled program) or runs programs of its own (a pass over a dataset).

Users call :meth:`LinearOperator.matvec` on pytrees like the params, and
restrict or precondition any operator, their own included
(:func:`linear_operator`), with :meth:`~LinearOperator.restrict` and
:meth:`~LinearOperator.precondition`.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_optax import _loops
from adahessian_optax import _programs
from adahessian_optax import _pytree
from adahessian_optax import _tree


class Space(NamedTuple):
  """The float leaves of a params pytree that an operator acts on.

  Attributes:
    treedef: the params' structure.
    index: the positions, among all leaves, of the leaves acted on.
    avals: ``(shape, dtype)`` of every leaf of the params.
    placement: per leaf acted on, the sharding its vectors take when the
      params are concrete and on several devices (None: where XLA puts them).
  """

  treedef: Any
  index: tuple
  avals: tuple
  placement: Optional[tuple] = None

  @classmethod
  def of(cls, params: Any, index: Optional[tuple] = None) -> "Space":
    leaves, treedef = jax.tree.flatten(params)
    if index is None:
      index = tuple(i for i, x in enumerate(leaves)
                    if _tree.is_differentiable(x))
    avals = tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves)
    chosen = [leaves[i] for i in index]
    placement = None
    if chosen and all(_is_concrete(x) for x in chosen) and any(
        len(x.sharding.device_set) > 1 for x in chosen):
      placement = tuple(x.sharding for x in chosen)
    return cls(treedef, tuple(index), avals, placement)

  @property
  def shapes(self) -> list:
    """`(shape, dtype)` of each leaf acted on."""
    return [self.avals[i] for i in self.index]

  # The leaves of a tree structured like the params that are acted on, and
  # that tree with them replaced: FloatLeaves' own, on the same two fields.
  select = _tree.FloatLeaves.select
  replace = _tree.FloatLeaves.replace

  def embed(self, values: list, leading: tuple = ()) -> Any:
    """A pytree like the params: `values` at the leaves acted on, zeros of
    shape ``leading + leaf shape`` elsewhere (scalars for ``leading=None``)."""
    zeros = [jnp.zeros(() if leading is None else leading + shape,
                       values[0].dtype if leading is None else dtype)
             for shape, dtype in self.avals]
    for i, v in zip(self.index, values):
      zeros[i] = v
    return self.treedef.unflatten(zeros)

  def dimension(self) -> int:
    return sum(int(np.prod(shape)) for shape, _ in self.shapes)


def _is_concrete(x: Any) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


class LinearOperator:
  """A symmetric linear operator on the float leaves of a params pytree.

  The algorithms (:func:`~adahessian_optax.eigenpairs`,
  :func:`~adahessian_optax.trace`, :func:`~adahessian_optax.spectral_density`,
  :func:`~adahessian_optax.per_layer`) take any operator. Build one from a
  loss with :func:`~adahessian_optax.curvature_operator`, or from your own
  matrix-vector product with :func:`~adahessian_optax.linear_operator`.
  Operators are pytrees: they can be passed into and returned from
  ``jax.jit``.
  """

  space: Space
  traceable: bool = True

  # Subclasses: the product on a list of leaves (each at least float32).
  def apply(self, vector: list) -> list:
    raise NotImplementedError

  @property
  def mask(self) -> tuple:
    """Per leaf, None (all entries) or the 0/1 entries acted on."""
    return (None,) * len(self.space.index)

  @property
  def size(self) -> int:
    """The number of entries the operator acts on (its dimension)."""
    return self.space.dimension()

  def matvec(self, v: Any) -> Any:
    """The product with `v`, a pytree like the params.

    Only the leaves the operator acts on are read; the result is a pytree
    like the params with zeros elsewhere, each leaf in at least float32.
    """
    vector = [jnp.asarray(x) for x in self.space.select(v)]
    vector = [x.astype(_tree.at_least_float32(x.dtype)) for x in vector]
    vector = mask_vector(self, vector)
    return self.space.embed(self.apply(vector))

  def restrict(self, wrt: Any) -> "LinearOperator":
    """The diagonal block of the entries `wrt` selects.

    Args:
      wrt: a pytree prefix of the params whose leaves are bools or boolean
        arrays broadcastable to the leaves below them, or a function of the
        params returning one (as optax's masks); it is read against the
        operator's space, and applies on top of an earlier restriction.

    Returns:
      The restricted operator; its matvec is zero outside the block.
    """
    index, masks = selection(self.space, wrt)
    return _block(self, index, masks, None)

  def precondition(self, preconditioner: Any) -> "LinearOperator":
    r"""The operator :math:`P^{-1/2} A P^{-1/2}` for a positive diagonal P.

    It has the eigenvalues of :math:`P^{-1} A`, the matrix that decides the
    stability of an adaptive method whose step is :math:`-\eta P^{-1} m`.

    Args:
      preconditioner: :math:`P`, a pytree like the params (any containers
        with the same leaves in the same order, such as the boxed state of
        an ``nnx.Optimizer``), e.g. from
        :func:`~adahessian_optax.adam_preconditioner`.

    Returns:
      The preconditioned operator.
    """
    return _block(self, tuple(range(len(self.space.index))),
                  (None,) * len(self.space.index),
                  inverse_sqrt(preconditioner, self.space))

  def run(self, algorithm: Callable, *args: Any, **settings: Any) -> Any:
    """`algorithm(self, loops, *args, **settings)` with the loops it needs.

    ``lax`` loops when the product traces: inline under a transformation,
    otherwise as one compiled program (``settings`` are static). Python
    loops around the product's own programs otherwise.
    """
    if not self.traceable:
      return algorithm(self, _loops.HOST, *args, **settings)
    if _programs.is_traced((self, args)):
      return algorithm(self, _loops.TRACED, *args, **settings)
    return _programs.call(_run_traced, (self, args), algorithm=algorithm,
                          settings=tuple(sorted(settings.items())))


def _run_traced(op, args, *, algorithm, settings):
  return algorithm(op, _loops.TRACED, *args, **dict(settings))


def mask_vector(op: LinearOperator, v: list) -> list:
  """`v` with the entries the operator does not act on set to zero."""
  return [x if m is None else x * m.astype(x.dtype) for m, x in zip(op.mask,
                                                                      v)]


# ---------------------------------------------------------------------------
# Restriction and preconditioning: one wrapper for every operator.


@_pytree.dataclass
class _Block(LinearOperator):
  """`S A S` on the leaves `index` of `inner`'s space, S diagonal."""

  inner: LinearOperator
  index: tuple
  masks: tuple
  scale: tuple
  count: int

  @property
  def space(self) -> Space:
    inner = self.inner.space
    placement = None if inner.placement is None else tuple(
        inner.placement[i] for i in self.index)
    return Space(inner.treedef, tuple(inner.index[i] for i in self.index),
                 inner.avals, placement)

  @property
  def traceable(self) -> bool:
    return self.inner.traceable

  @property
  def mask(self) -> tuple:
    return self.masks

  @property
  def size(self) -> int:
    return self.count

  def apply(self, vector: list) -> list:
    scaled = _times(self.scale, vector)
    full = [jnp.zeros(shape, _tree.at_least_float32(dtype))
            for shape, dtype in self.inner.space.shapes]
    for i, x in zip(self.index, scaled):
      full[i] = x
    out = self.inner.apply(full)
    return _times(self.scale, [out[i] for i in self.index])


def _times(scale: tuple, v: list) -> list:
  return [x if s is None else x * s.astype(x.dtype) for s, x in zip(scale, v)]


def _block(op: LinearOperator, index: tuple, masks: tuple,
           inverse: Optional[list]) -> LinearOperator:
  """`op` restricted to `index` (positions in its space) with `masks`, and
  scaled by `inverse` (per leaf of its space, or None); nested blocks are
  merged into one."""
  inner, outer_index, outer_masks, outer_scale = op, None, None, None
  if isinstance(op, _Block):
    inner = op.inner
    outer_index, outer_masks, outer_scale = op.index, op.masks, op.scale
  if outer_index is None:
    outer_index = tuple(range(len(op.space.index)))
    outer_masks = tuple(op.mask)
    outer_scale = (None,) * len(outer_index)
  new_index = tuple(outer_index[i] for i in index)
  new_masks, new_scale = [], []
  for j, i in enumerate(index):
    mask = _and(outer_masks[i], masks[j])
    new_masks.append(mask)
    s = outer_scale[i]
    if inverse is not None and inverse[i] is not None:
      s = inverse[i] if s is None else s * inverse[i]
    new_scale.append(_and(s, masks[j]) if masks[j] is not None else s)
  count = 0
  for m, i in zip(new_masks, new_index):
    if isinstance(m, jax.core.Tracer):
      raise ValueError(
          "cannot restrict, under a transformation, an operator already "
          "restricted to part of a leaf: its entries would no longer be "
          "known; build it with the combined wrt instead")
    count += (int(np.prod(inner.space.shapes[i][0])) if m is None
              else int(np.sum(np.asarray(m))))
  if count == 0:
    raise ValueError("wrt selects no floating-point entry")
  return _Block(inner, new_index, tuple(new_masks), tuple(new_scale), count)


def _and(a: Any, b: Any) -> Any:
  if a is None:
    return b
  if b is None:
    return a
  return a * b


def selection(space: Space, wrt: Any,
              params: Any = None) -> tuple[tuple, tuple]:
  """`(index, masks)`: the positions in `space` of the leaves `wrt` keeps,
  each with None (all entries) or a 0/1 float32 mask.

  `wrt` is None (everything), a pytree prefix of the params whose leaves
  are bools or boolean arrays broadcastable to the leaves below them, or a
  function of the params returning one (called on `params`, or on their
  shapes when not given).
  """
  n = len(space.index)
  if wrt is None:
    return tuple(range(n)), (None,) * n
  if callable(wrt):
    if params is None:
      params = space.treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype)
                                        for shape, dtype in space.avals])
    wrt = wrt(params)
  skeleton = space.treedef.unflatten([0] * len(space.avals))
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), wrt,
                        skeleton)
    flags = space.treedef.flatten_up_to(full)
  except (ValueError, TypeError) as e:
    flags = _flags_by_path(wrt, skeleton)
    if flags is None:
      raise ValueError(
          "wrt must be a pytree prefix of params (or a function of params "
          f"returning one) with bool leaves: {e}") from None
  index, masks = [], []
  for position, i in enumerate(space.index):
    flag = flags[i]
    if isinstance(flag, jax.core.Tracer):
      raise TypeError(
          "wrt must be concrete (it fixes the operator's dimension); it was "
          "traced. Build it from shapes, not values")
    mask = np.asarray(flag)
    if mask.dtype != bool:
      raise TypeError(
          f"wrt's leaves must be bools or boolean arrays, got {mask.dtype}")
    shape = space.avals[i][0]
    try:
      mask = np.broadcast_to(mask, shape)
    except ValueError:
      raise ValueError(
          f"a wrt mask of shape {mask.shape} does not broadcast to its "
          f"leaf's shape {shape}") from None
    count = int(mask.sum())
    if count == 0:
      continue
    index.append(position)
    masks.append(None if count == mask.size else mask.astype(np.float32))
  if not index:
    raise ValueError("wrt selects no floating-point entry")
  return tuple(index), tuple(masks)


def _names(path: tuple) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
               for k in path)


def _flags_by_path(wrt: Any, skeleton: Any) -> Optional[list]:
  """The flag of each leaf of `skeleton` from the longest path of `wrt`
  that leads to it, key by key whatever the containers (a plain dict for an
  ``nnx.State``, say); None when some leaf has none."""
  table = {_names(path): flag for path, flag in
           jax.tree_util.tree_leaves_with_path(wrt)}
  flags = []
  for path, _ in jax.tree_util.tree_leaves_with_path(skeleton):
    names = _names(path)
    found = next((names[:n] for n in range(len(names), -1, -1)
                  if names[:n] in table), None)
    if found is None:
      return None
    flags.append(table[found])
  return flags


def inverse_sqrt(preconditioner: Any, space: Space) -> list:
  """`P^-1/2` at the leaves of `space`, in at least float32."""
  try:
    values = space.select(preconditioner)
  except (ValueError, TypeError) as e:
    # The same leaves in other containers (an nnx.Optimizer's state holds
    # OptVariable where the params hold Param): matched by position.
    leaves = jax.tree.leaves(preconditioner)
    if len(leaves) != len(space.avals):
      raise ValueError(
          "preconditioner must be a pytree like params (a positive diagonal "
          f"P per leaf): {e}") from None
    values = [leaves[i] for i in space.index]
  out = []
  for p, (shape, _) in zip(values, space.shapes):
    if _is_concrete(p) and not np.all(np.asarray(p) > 0):
      raise ValueError(
          "the preconditioner must be positive (P^-1/2 is taken); add the "
          "optimizer's eps")
    p = jnp.asarray(p)
    if jnp.shape(p) != tuple(shape):
      raise ValueError(
          f"a preconditioner leaf of shape {jnp.shape(p)} does not match its "
          f"parameter's shape {tuple(shape)}")
    out.append(jax.lax.rsqrt(p.astype(_tree.at_least_float32(p.dtype))))
  return out


# ---------------------------------------------------------------------------
# The user's own operator.


@_pytree.dataclass
class _MatvecOperator(LinearOperator):
  fn: Callable
  space: Space
  traceable: bool = True

  def apply(self, vector: list) -> list:
    like = [jnp.zeros(shape, dtype) for shape, dtype in self.space.avals]
    tree = self.space.treedef.unflatten(like)
    out = self.fn(self.space.replace(tree, [
        x.astype(dtype) for x, (_, dtype) in zip(vector, self.space.shapes)]))
    return _tree.widen([jnp.asarray(x) for x in self.space.select(out)])


def linear_operator(matvec: Callable[[Any], Any], like: Any, *,
                    traceable: bool = True) -> LinearOperator:
  r"""Your own symmetric operator, for every algorithm of this library.

  ``matvec`` maps a pytree like ``like`` to one like it: a dense matrix
  (``lambda v: unravel(A @ ravel(v))``), a Fisher or kernel you wrote as a
  pytree product, a finite-difference product. The algorithms read only
  the floating-point leaves; the operator can be restricted
  (:meth:`~LinearOperator.restrict`) and preconditioned
  (:meth:`~LinearOperator.precondition`) like the library's own.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``; it must be linear and
      symmetric (the algorithms assume :math:`A = A^\top`).
    like: a pytree of arrays (or :class:`jax.ShapeDtypeStruct`) giving the
      space: shapes, dtypes and, for concrete sharded arrays, placement.
    traceable: whether ``matvec`` can be traced (then the algorithms run in
      ``lax`` loops, in one compiled program). Pass False for a product
      that runs programs of its own (a loop over data in Python).

  Returns:
    A :class:`LinearOperator`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> A = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    >>> op = aho.linear_operator(lambda v: {"w": A @ v["w"]},
    ...                          {"w": jnp.zeros(2)})
    >>> print(op.size, op.matvec({"w": jnp.ones(2)})["w"])
    2 [3. 3.]
    >>> print(*(f"{v:.3f}" for v in aho.eigenpairs(op, key=0, k=2).values))
    3.000 1.000
  """
  if not callable(matvec):
    raise TypeError(
        f"linear_operator: matvec must be a callable, got "
        f"{type(matvec).__name__}")
  space = Space.of(like)
  if not space.index:
    raise ValueError(
        "linear_operator: `like` has no floating-point leaf to act on")
  return _MatvecOperator(matvec, space, bool(traceable))
