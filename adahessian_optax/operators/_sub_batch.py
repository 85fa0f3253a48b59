r"""A loss whose curvature is taken on a sub-batch (as Sophia does)."""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _pytree
from adahessian_optax import _xla_cpu
from adahessian_optax.operators import _curvature


def batch_size(batch: Any) -> int:
  """The common leading dimension of a batch's array leaves."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if not sizes or None in sizes or len(sizes) != 1:
    raise ValueError(
        "the batch must be a pytree of arrays sharing their leading "
        f"(example) dimension, got leading dimensions {sorted(map(str, sizes))}")
  return sizes.pop()


@_pytree.dataclass
class SubBatchValueFn(_curvature.Curvature):
  """A mean loss over a batch whose Hessian is taken on its first examples.

  Made by :func:`sub_batch_value_fn`. Called on params it is the loss of the
  whole batch, ``w * loss_fn(p, head) + (1 - w) * loss_fn(p, tail)`` with
  ``w = size / n``; its curvature is the head's alone, processed in
  ``chunks`` sequential pieces by the estimators.

  Attributes:
    loss_fn: ``(params, batch) -> scalar``, a mean over the batch's examples.
    batch: a pytree of arrays with the examples along their leading axis.
    size: the number of leading examples the Hessian is taken on.
    chunks: the number of equal pieces the head is processed in.
  """

  loss_fn: Callable[[Any, Any], jax.Array]
  batch: Any
  size: int
  chunks: int = 1

  def head_chunks(self) -> tuple[float, list]:
    """`(weight, pieces)`: the head's pieces, each weighted by its share.

    The pieces are strided: piece ``i`` holds the head's examples ``i, c + i,
    2c + i, ...`` (``head.reshape(m / c, c, ...)[:, i]``), so that when the
    batch is split over devices on its leading axis each piece keeps the
    same share of every device's examples and none is moved between
    devices (contiguous pieces would sit on a few devices, and XLA would
    gather them there). Their sum is the head's loss, as for any partition.
    """
    n, c = batch_size(self.batch), self.chunks
    strided = lambda x: x[:self.size].reshape((self.size // c, c)
                                              + x.shape[1:])
    pieces = [jax.tree.map(lambda x, i=i: strided(x)[:, i], self.batch)
              for i in range(c)]
    return self.size // c / n, pieces

  def tail(self) -> Optional[Callable[[Any], jax.Array]]:
    """The tail's loss, weighted by its share of the batch, or None."""
    n = batch_size(self.batch)
    if self.size == n:
      return None
    examples = jax.tree.map(lambda x: x[self.size:], self.batch)
    return lambda p: (1 - self.size / n) * self.loss_fn(p, examples)

  def __call__(self, params: Any) -> jax.Array:
    weight, pieces = self.head_chunks()
    value = sum(weight * self.loss_fn(params, b) for b in pieces)
    tail = self.tail()
    return value if tail is None else value + tail(params)

  def linearize(self, params, space, *batch, axis_name=None):
    """The head's products (unchunked); the whole batch's value and grad."""
    del batch
    w = self.size / batch_size(self.batch)
    examples = jax.tree.map(lambda x: x[:self.size], self.batch)
    head = lambda p: w * self.loss_fn(p, examples)
    value_and_grad, leaves = _curvature.value_and_grad_of_leaves(
        head, params, space, (), axis_name)
    with _curvature.forward_mode():
      (value, grad), tangent_map = jax.linearize(value_and_grad, leaves)
    value, grad = _plus_tail(value, grad, self.tail(), params, space,
                             axis_name)
    return value, grad, jax.tree_util.Partial(_product, tangent_map, w)

  def products(self, params, space, tangents, combine, *, axis_name=None):
    """The head's products summed over its pieces, one after the other."""
    w = self.size / batch_size(self.batch)
    value, grad, combined = _chunked_products(
        self, params, space, tangents,
        lambda ts, hs: combine(ts, [[h / w for h in hv] for hv in hs]),
        axis_name)
    value, grad = _plus_tail(value, grad, self.tail(), params, space,
                             axis_name)
    return value, grad, combined


def _product(tangent_map: Any, w: float, v: list) -> list:
  return [h / w for h in tangent_map(v)[1]]


def _tree_sum(trees: list) -> Any:
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def _chunked_products(value_fn, params, space, tangents, combine, axis_name):
  """The Hessian kind's products summed over the head's pieces."""
  weight, pieces = value_fn.head_chunks()
  one = lambda examples: _curvature.Hessian(
      lambda p: weight * value_fn.loss_fn(p, examples)).products(
          params, space, tangents, combine, axis_name=axis_name)
  if len(pieces) == 1:
    return one(pieces[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(one, pieces[0]))
  # The pieces of head_chunks stacked as (c, m / c, ...) by a reshape and a
  # transpose (no copy of a piece): the scan slices the first axis, and a
  # leading-axis split of the batch stays on the second (m / c) axis.
  c, m = len(pieces), value_fn.size
  stacked = jax.tree.map(
      lambda x: jnp.swapaxes(x[:m].reshape((m // c, c) + x.shape[1:]), 0, 1),
      value_fn.batch)
  # The body through _xla_cpu.call: on XLA:CPU its convolutions are written
  # in the layout that runs fast inside a loop.
  return jax.lax.scan(
      lambda total, b: (_tree_sum([total, _xla_cpu.call(one, b)]), None),
      zeros, stacked)[0]


def _plus_tail(value, grad, tail, params, space, axis_name):
  """Adds the value and gradient of the part without products, if any."""
  if tail is None:
    return value, grad
  value_and_grad, leaves = _curvature.value_and_grad_of_leaves(
      tail, params, space, (), axis_name)
  tail_value, tail_grad = value_and_grad(leaves)
  return value + tail_value, [a + b for a, b in zip(grad, tail_grad)]


def sub_batch_value_fn(loss_fn: Callable[[Any, Any], jax.Array], batch: Any,
                       fraction: float = 1.0, *,
                       chunks: int = 1) -> SubBatchValueFn:
  r"""A loss closure whose Hessian is estimated on a fraction of the batch.

  As Sophia does, the gradient comes from the whole batch and the
  Hessian-vector product from its first :math:`m = \max(1,
  \mathrm{round}(f n))` examples. For a mean loss :math:`L = w L_m +
  (1 - w) L_{n-m}` with :math:`w = m / n`, the estimators take
  :math:`H_m z` (the Hessian of :math:`L_m`, so the estimate is unbiased for
  the sub-batch's Hessian diagonal) and the gradient as the sum of the two
  parts' gradients, so that the sub-batch's gradient is the primal output of
  the same forward-over-reverse pass: the fused step costs about
  :math:`1 + (F - 1) f` gradients, :math:`F` the cost of one product.

  With ``chunks`` :math:`= c > 1` the sub-batch is processed in :math:`c`
  equal pieces one after the other (:func:`jax.lax.scan`), so that a refresh
  step holds the tangent activations of :math:`m / c` examples only: the
  same numbers with less memory, for models whose activations dominate it
  (a Transformer's, not an MLP's, whose tangents are parameter-sized). The
  pieces are strided (piece :math:`i` holds examples :math:`i, c + i, 2c +
  i, \dots`), so that with the batch split over devices on its leading
  axis each piece is cut within every device's shard and nothing is moved
  between devices, when :math:`c` divides each device's share of
  :math:`m`. On
  XLA:CPU the loop's body is traced with its convolutions in the layout
  that runs fast inside a loop, so a CNN's pieces cost no extra time.

  Use it wherever a loss closure goes: ``value_grad_and_hessian``,
  ``update(..., value_fn=...)``, :func:`hutchinson_diagonal`, the analysis.
  Called on params it returns the loss of the whole batch, so in the plain
  call compute the gradient of this closure (``jax.grad(value_fn)``), which
  XLA can then share with the estimator's pass (not across the chunks'
  loop: with ``chunks > 1`` use the fused step). The loss must be a mean
  over independent examples: with BatchNorm in training mode, the parts
  would be normalised with their own statistics.

  Args:
    loss_fn: ``(params, batch) -> scalar``, the mean loss over the batch's
      examples.
    batch: a pytree of arrays with the examples along their leading axis
      (shuffled, so that its first examples are a random sub-batch).
    fraction: :math:`f \in (0, 1]`, the share of the batch for the Hessian.
    chunks: the number of pieces the sub-batch is processed in; it must
      divide :math:`m` (and, for a batch split over devices, each device's
      share of it).

  Returns:
    A :class:`SubBatchValueFn` (a callable ``params -> scalar``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> x = jnp.array([1.0, 2.0, 3.0, 4.0])
    >>> loss = lambda w, x: jnp.mean(x * w ** 2)
    >>> value_fn = aho.sub_batch_value_fn(loss, x, fraction=0.5)
    >>> print(value_fn(jnp.ones(())))   # the whole batch's loss
    2.5
    >>> print(aho.hutchinson_diagonal(value_fn, jnp.ones(()), 0).diagonal)
    3.0

  References:
    Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023.
  """
  if not callable(loss_fn):
    raise TypeError(
        "sub_batch_value_fn: loss_fn must be a callable (params, batch) -> "
        f"scalar, got {type(loss_fn).__name__}")
  if (isinstance(fraction, bool)
      or not isinstance(fraction, (int, float))
      or not 0 < fraction <= 1):
    raise ValueError(
        f"sub_batch_value_fn: fraction must be a number in (0, 1], got "
        f"{fraction!r}")
  if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
    raise ValueError(
        f"sub_batch_value_fn: chunks must be an int >= 1, got {chunks!r}")
  n = batch_size(batch)
  size = max(1, min(n, round(fraction * n)))
  if size % chunks:
    raise ValueError(
        f"sub_batch_value_fn: chunks={chunks} does not divide the "
        f"{size} examples of the Hessian's sub-batch (fraction={fraction} "
        f"of {n})")
  return SubBatchValueFn(loss_fn, batch, size, chunks)
