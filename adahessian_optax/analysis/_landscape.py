r"""Loss landscapes: the loss on a line or a plane through the params.

:func:`loss_landscape` evaluates :math:`L(\theta + \alpha d_1)` on a 1-D grid
or :math:`L(\theta + \alpha d_1 + \beta d_2)` on a 2-D grid, the grid points
one at a time or in batches (``jax.lax.map``, ``vmap`` in chunks of
``batch_size``) in one compiled program. The directions are the top Hessian
eigenvectors (PyHessian) or random directions rescaled filter by filter to
the params (:func:`filter_normalized_direction`, Li et al.).
"""

import functools
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_optax import _checks
from adahessian_optax import _programs
from adahessian_optax import _pytree
from adahessian_optax.operators import _curvature
from adahessian_optax.algorithms import _lanczos
from adahessian_optax import _probes
from adahessian_optax import _tree

_EIGENVECTOR_HINT = (
    "; take eigenvector i from hessian_eigenvalues' vectors (one leading "
    "axis per vector) with jax.tree.map(lambda v: v[i], vectors)")


# ---------------------------------------------------------------------------
# Filter-normalized random directions.


def _filter_axes(filter_axes: Any, params: Any,
                 split: _tree.FloatLeaves) -> tuple:
  """The rule of each float leaf: None, "zero" or an axis in [0, ndim)."""
  if callable(filter_axes):
    filter_axes = filter_axes(params)
  try:
    full = jax.tree.map(lambda a, sub: jax.tree.map(lambda _: a, sub),
                        filter_axes, params, is_leaf=lambda a: a is None)
    rules = split.treedef.flatten_up_to(full)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "filter_axes must be a pytree prefix of params (or a "
        "function of params returning one) whose leaves are an int axis, "
        f"None or \"zero\": {e}") from None
  paths = [_tree.path_str(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(params)]
  leaves = jax.tree.leaves(params)
  out = []
  for i in split.index:
    rule, ndim = rules[i], jnp.ndim(leaves[i])
    if rule is None or (isinstance(rule, str) and rule == "zero"):
      out.append(rule)
    elif isinstance(rule, numbers.Integral) and not isinstance(rule, bool):
      if not -ndim <= rule < ndim:
        raise ValueError(
            f"filter axis {rule} at {paths[i]} is out of range for "
            f"a leaf of shape {jnp.shape(leaves[i])}")
      out.append(int(rule) % ndim)
    else:
      raise TypeError(
          f"filter_axes at {paths[i]} must be an int axis, None or "
          f"\"zero\", got {rule!r}")
  return tuple(out)


def _normal_like(key: jax.Array, leaves: list) -> list:
  """Standard normal entries shaped like `leaves` (in at least float32),
  from one draw: a draw per leaf (threefry) compiled about 4x slower."""
  typed = _probes.threefry_key(key)
  sizes = [x.size for x in leaves]
  flat = jax.random.normal(typed, (sum(sizes),),
                           _lanczos.accumulation_dtype(leaves))
  ends = np.cumsum(sizes)
  return [flat[end - size:end].reshape(x.shape).astype(
      _tree.at_least_float32(x.dtype))
          for x, size, end in zip(leaves, sizes, ends)]


@functools.partial(jax.jit, static_argnums=2)
def _normalized_draw(key: jax.Array, leaves: list, rules: tuple) -> list:
  draws = _normal_like(key, leaves)
  out = []
  for x, d, rule in zip(leaves, draws, rules):
    if rule == "zero":
      out.append(jnp.zeros_like(x))
      continue
    others = None if rule is None else tuple(
        a for a in range(x.ndim) if a != rule)
    norm = lambda y: jnp.sqrt(jnp.sum(y * y, axis=others, keepdims=True))
    d_norm = norm(d)
    scale = norm(x.astype(d.dtype)) / jnp.where(d_norm > 0, d_norm, 1)
    out.append((d * scale).astype(x.dtype))
  return out


def filter_normalized_direction(key: Any, params: Any, *,
                                filter_axes: Any = None) -> Any:
  r"""A random direction rescaled filter by filter to the norms of the params.

  Li et al.'s direction for loss-landscape plots: draw :math:`d` with
  standard normal entries, then rescale each filter :math:`d_{i,j}` (filter
  :math:`j` of leaf :math:`i`, all the weights that make one output channel)
  to the norm of the same filter of :math:`\theta`:

  .. math::
    d_{i,j} \leftarrow \frac{d_{i,j}}{\|d_{i,j}\|}\, \|\theta_{i,j}\|,

  so that a step :math:`\alpha d` moves every filter by the fraction
  :math:`\alpha` of its own size. A layer followed by BatchNorm computes
  the same function at any scale of its weights, so a step of a given norm
  means little by itself; rescaled, the steps mean the same in every layer,
  and landscapes of different networks can be compared.

  Which axis of a leaf holds its filters is not guessed from its rank (a
  stacked or attention kernel has the rank of a convolution): pass it in
  ``filter_axes``. Li et al.'s code sets the direction to zero on biases
  and normalization parameters (its default ``ignore="biasbn"``): give
  those leaves ``"zero"``.

  Args:
    key: an int seed or a JAX PRNG key.
    params: the pytree :math:`\theta` the direction is for.
    filter_axes: what to do at each leaf: a pytree prefix of params (or a
      function of params returning one) whose leaves are

      * an int, the leaf's output-channel axis (``-1`` for Flax kernels,
        ``(..., in, out)``; ``0`` for PyTorch and Equinox layouts,
        ``(out, in, ...)``): every slice along it is a filter;
      * None: the whole leaf is one filter (rescaled to the leaf's norm);
      * ``"zero"``: zero direction, the leaf stays put.

      A single value applies to every leaf; the default None rescales
      whole leaves.

  Returns:
    A pytree like params, each leaf in its dtype; zeros at leaves that are
    not floating-point.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "b": jnp.ones(2)}
    >>> d = aho.filter_normalized_direction(
    ...     0, params, filter_axes={"w": -1, "b": "zero"})
    >>> print(jnp.linalg.norm(d["w"], axis=0))  # each column's norm is w's
    [5. 1.]
    >>> print(d["b"])
    [0. 0.]

  References:
    Li, Xu, Taylor, Studer and Goldstein, `Visualizing the Loss Landscape of
    Neural Nets <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  key = _probes.key_data(key, "filter_normalized_direction")
  _checks.check_params("filter_normalized_direction", params)
  split = _tree.FloatLeaves.of(params)
  rules = _filter_axes(filter_axes, params, split)
  zeros = jax.tree.map(jnp.zeros_like, params)
  if not split.index:
    return zeros
  return split.replace(zeros, _normalized_draw(key, split.select(params),
                                               rules))


# ---------------------------------------------------------------------------
# The loss on a grid.


def _axis(values: Any, name: str) -> jax.Array:
  """A grid axis: a non-empty 1-D array of finite real coordinates."""
  x = values if isinstance(values, jax.Array) else jnp.asarray(values)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(
        f"{name} must be a non-empty 1-D array of coordinates, got "
        f"shape {x.shape}")
  if x.dtype == bool or not (jnp.issubdtype(x.dtype, jnp.floating)
                             or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(
        f"{name} must hold real numbers, got dtype {x.dtype}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has a non-finite coordinate")
  return x


def _coordinates(grid: Any, n: int) -> tuple[tuple, tuple]:
  """`(coordinates of each point, one array per direction), grid shape)`."""
  if n == 1:
    alphas = _axis(grid, "grid")
    return (alphas,), alphas.shape
  if not isinstance(grid, (tuple, list)) or len(grid) != 2:
    raise ValueError(
        "with two directions, grid must be a pair (alphas, betas) "
        f"of 1-D arrays, got {type(grid).__name__}")
  alphas = _axis(grid[0], "grid[0]")
  betas = _axis(grid[1], "grid[1]")
  shape = alphas.shape + betas.shape
  return (jnp.broadcast_to(alphas[:, None], shape).reshape(-1),
          jnp.broadcast_to(betas[None, :], shape).reshape(-1)), shape


def _losses(kind, params, directions, coordinates, batch, *, split,
            batch_size):
  """`(losses at the points, squared norm of each direction, params finite)`.

  Each point is computed in at least float32, then cast to the leaf's dtype
  (what the model sees); the losses are returned in at least float32.
  """
  params = params.value
  theta = split.select(params)

  def loss_at(c):
    moved = []
    for j, x in enumerate(theta):
      dtype = _tree.at_least_float32(x.dtype)
      y = x.astype(dtype)
      for cj, d in zip(c, directions):
        y = y + cj.astype(dtype) * d[j].astype(dtype)
      moved.append(y.astype(x.dtype))
    point = split.replace(params, moved)
    loss = _curvature.scalar_loss(kind, point, *batch)
    return loss.astype(_tree.at_least_float32(loss.dtype))

  losses = jax.lax.map(loss_at, coordinates, batch_size=batch_size)
  square_norms = [jnp.sum(_lanczos.leaf_dots(*[_tree.widen(d)] * 2))
                  for d in directions]
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in theta]))
  return losses, square_norms, finite


def _check_result(square_norms, finite):
  """Outside jit, non-finite or zero inputs are errors (traced: NaN)."""
  if _programs.is_traced((square_norms, finite)):
    return
  for i, s in enumerate(np.asarray(square_norms)):
    if not np.isfinite(s):
      raise ValueError(f"directions[{i}] has a non-finite entry")
    if s == 0:
      raise ValueError(
          f"directions[{i}] is zero at every floating-point leaf "
          "of params, so the loss along it is constant")
  if not bool(finite):
    raise ValueError("params has a non-finite entry")


def loss_landscape(value_fn: Any, params: Any, directions: Sequence[Any],
                   grid: Any, *, batch_size: Optional[int] = None
                   ) -> jax.Array:
  r"""The loss on a line or a plane through the params, on a grid.

  With one direction :math:`d` and coordinates :math:`\alpha_1, \dots,
  \alpha_n`, or two directions and coordinates :math:`\alpha_i`,
  :math:`\beta_j`,

  .. math::
    \ell_i = L(\theta + \alpha_i d), \qquad
    \ell_{ij} = L(\theta + \alpha_i d_1 + \beta_j d_2).

  Along a unit eigenvector :math:`v` of the Hessian with eigenvalue
  :math:`\lambda`, :math:`L(\theta + \alpha v) = L(\theta) + \alpha\,
  \nabla L^\top v + \tfrac12 \lambda \alpha^2 + O(\alpha^3)`: the curve's
  curvature at 0 is :math:`\lambda` (a ReLU network's loss is smooth only
  piecewise, and bends more than that between grid points). PyHessian
  plots the loss along the top eigenvector for :math:`\alpha \in [-0.5,
  0.5]` and over the plane of the top two; Li et al. along random
  :func:`filter_normalized_direction`\ s.
  Eigenvectors come from :func:`hessian_eigenvalues`, whose ``vectors``
  stack them on a leading axis: take the ``i``-th with
  ``jax.tree.map(lambda v: v[i], vectors)``.

  Each point costs one forward pass. The points are evaluated in one
  compiled program by ``jax.lax.map``: one at a time, or ``batch_size`` at
  a time under ``vmap``, which holds ``batch_size`` forward passes'
  activations at once. Batching pays on accelerators; on XLA:CPU a
  convolution whose kernel is batched becomes a grouped convolution, about
  4x slower per point than one point at a time (a small CNN).
  Outside a transformation the program is compiled once per
  ``value_fn`` object and shapes, and kept for the 8 most recent losses
  (define the loss once to draw several landscapes; as under ``jax.jit``,
  what it reads besides its argument is fixed at that compile); under
  ``jax.jit`` it becomes part of the caller's program. Only the
  floating-point leaves move (the others keep their values); each point is
  formed in at least float32 and cast to the leaf's dtype.

  Args:
    value_fn: the loss, ``params -> scalar`` (a closure, a :func:`ggn`), or
      a :class:`DatasetLoss` (the mean over its batches: each batch is one
      compiled pass over the whole grid).
    params: the pytree :math:`\theta` at the centre of the grid.
    directions: a list of one or two pytrees like params: :math:`[d]` or
      :math:`[d_1, d_2]` (only their floating-point leaves are used).
    grid: for one direction, the coordinates :math:`\alpha`, a 1-D array;
      for two, a pair ``(alphas, betas)`` of 1-D arrays.
    batch_size: as in ``jax.lax.map``: None evaluates the points one at a
      time; an int, that many at a time under ``vmap`` (the last chunk may
      be smaller).

  Returns:
    The losses, shape ``(len(alphas),)`` or ``(len(alphas), len(betas))``
    (row ``i`` at :math:`\alpha_i`), in at least float32. Outside jit a
    non-finite entry in the params or a direction, or a zero direction, is
    an error.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> A = jnp.diag(jnp.array([1.0, 2.0, 5.0]))
    >>> loss = lambda p: 0.5 * p @ A @ p
    >>> theta = jnp.zeros(3)
    >>> top = aho.hessian_eigenvalues(loss, theta, key=0, k=2)
    >>> v1, v2 = [jax.tree.map(lambda v: v[i], top.vectors) for i in (0, 1)]
    >>> alphas = jnp.linspace(-1.0, 1.0, 5)
    >>> print(jnp.round(aho.loss_landscape(loss, theta, [v1], alphas), 4))
    [2.5   0.625 0.    0.625 2.5  ]
    >>> plane = aho.loss_landscape(loss, theta, [v1, v2], (alphas, alphas))
    >>> print(plane.shape, jnp.round(plane[0, 0], 4))  # (5 + 2) / 2
    (5, 5) 3.5

  References:
    Li, Xu, Taylor, Studer and Goldstein, `Visualizing the Loss Landscape of
    Neural Nets <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.

    Yao, Gholami, Keutzer and Mahoney, `PyHessian: Neural Networks Through
    the Lens of the Hessian <https://arxiv.org/abs/1912.07145>`_, IEEE Big
    Data 2020.
  """
  _checks.check_params("loss_landscape", params)
  if not callable(value_fn):
    raise TypeError(
        "value_fn must be a callable params -> scalar loss or a "
        f"DatasetLoss, got {type(value_fn).__name__}")
  if batch_size is not None:
    _checks.check_positive_int("batch_size", batch_size, allow_traced=False)
    batch_size = int(batch_size)
  split = _tree.FloatLeaves.of(params)
  if not split.index:
    raise ValueError(
        "params has no floating-point leaf, so nothing can move")
  if not isinstance(directions, (list, tuple)):
    raise TypeError(
        "directions must be a list of one or two pytrees like "
        f"params, got {type(directions).__name__}{_EIGENVECTOR_HINT}")
  if len(directions) not in (1, 2):
    raise ValueError(
        "directions must hold one or two pytrees like params (a "
        f"line or a plane), got {len(directions)}")
  for i, d in enumerate(directions):
    _tree.check_same_structure(params, d, f"directions[{i}]",
                               _EIGENVECTOR_HINT)
  directions = [split.select(d) for d in directions]
  coordinates, shape = _coordinates(grid, len(directions))

  def add(total, kind, batch, n):
    args = (kind, _pytree.Box(params), directions, coordinates, batch)
    if _programs.is_traced(args):  # inside a transformation: it compiles this
      out = _losses(*args, split=split, batch_size=batch_size)
    else:
      out = _programs.call(_losses, args, split=split, batch_size=batch_size)
    term = (out[0] * n, *out[1:])
    return term if total is None else (total[0] + term[0], *term[1:])

  source = _curvature.as_curvature(value_fn)
  (losses, square_norms, finite), count = source.accumulate(add, None)
  losses = losses / count
  _check_result(square_norms, finite)
  return losses.reshape(shape)
