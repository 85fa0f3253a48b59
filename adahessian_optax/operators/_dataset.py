r"""A loss over a whole dataset, given as batches, and its operator."""

from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp

from adahessian_optax import _programs
from adahessian_optax import _pytree
from adahessian_optax import _tree
from adahessian_optax.operators import _base
from adahessian_optax.operators import _curvature
from adahessian_optax.operators import _sub_batch


def _leading_size(batch: Any) -> int:
  try:
    return int(_sub_batch.batch_size(batch))
  except ValueError as e:
    raise TypeError(
        f"DatasetLoss: cannot read the size of a batch ({e}); pass "
        "size_fn=<batch -> number of examples>") from None


class DatasetLoss(_curvature.Curvature):
  r"""A loss averaged over a dataset given as batches, for the analysis tools.

  Pass it in place of the loss closure to :func:`curvature_operator` and the
  analysis functions. With :math:`\ell_b` the mean loss over batch :math:`b`
  of :math:`n_b` examples and :math:`N = \sum_b n_b`, the loss and its
  curvature are

  .. math::
    L(\theta) = \sum_b \frac{n_b}{N} \ell_b(\theta), \qquad
    C v = \sum_b \frac{n_b}{N} C_b v,

  so a smaller last batch gets its share, no more (averaging the batches
  with equal weights would not be the curvature of the dataset's loss).
  :math:`C_b` is the Hessian of ``loss_fn``, or the curvature of its kind
  (a :func:`ggn`, an :func:`empirical_fisher` of ``(params, batch)``). Each
  product is one pass over the batches: a compiled per-batch product added
  into one running sum, so memory does not grow with the number of batches.
  The product is compiled once per ``loss_fn`` object and batch shape (a
  ragged last batch costs one more compile) and shared by every
  ``DatasetLoss`` of the same ``loss_fn``: define it once (not as a new
  lambda per call) to analyse repeatedly. As under ``jax.jit``, what
  ``loss_fn`` reads besides its arguments is fixed at that compile.

  Args:
    loss_fn: ``loss_fn(params, batch)``, the mean loss over one batch (a
      float scalar), or a curvature kind of ``(params, batch)``.
    batches: the batches, iterated once per product: a re-iterable
      collection (a list, a tuple, a data loader whose ``__iter__`` starts
      over) or a function of no arguments returning a fresh iterator. A
      one-shot iterator or generator is refused. It must give the same
      batches on every pass.
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
    self.curvature = _curvature.as_curvature(loss_fn)
    self.batches = batches
    self.size_fn = size_fn or _leading_size

  def iterate(self) -> Iterator:
    """A fresh iterator over the batches."""
    return iter(self.batches() if callable(self.batches) else self.batches)

  def accumulate(self, step: Callable[..., Any], total: Any) -> tuple:
    """`(total, N)` after `total = step(total, kind, (batch,), n_b)` over the
    batches: one pass, a running sum (see :meth:`Curvature.accumulate`)."""
    count = 0
    for batch in self.iterate():
      n = self.size_fn(batch)
      total = step(total, self.curvature, (batch,), n)
      count += n
    if count == 0:
      raise ValueError("DatasetLoss: the batches hold no examples")
    return total, count

  def __call__(self, params: Any) -> jax.Array:
    """The dataset's loss :math:`L(\\theta)` at `params`."""
    total, count = self.accumulate(
        lambda t, kind, b, n: t + n * _programs.call(
            _batch_value, (kind, _pytree.Box(params), b)), 0.0)
    return total / count

  def linearize(self, params, space, *batch, axis_name=None):
    raise TypeError(
        "a DatasetLoss loops over its batches in Python, so it has no "
        "single linearization: use it in the analysis (curvature_operator, "
        "hessian_eigenvalues, ...), not as an optimizer's loss")

  def products(self, params, space, tangents, combine, *, axis_name=None):
    return self.linearize(params, space)

  def operator(self, params, space, batch, axis_name):
    if axis_name is not None:
      raise ValueError(
          "axis_name applies to a loss closure; a DatasetLoss already sums "
          "over all of its batches")
    if batch:
      raise ValueError(
          "batch= applies to a loss closure; a DatasetLoss has its batches")
    if _programs.is_traced(params):
      raise TypeError(
          "a DatasetLoss loops over its batches in Python, so it cannot run "
          "under jax.jit or another transformation; call it on concrete "
          "params (each batch's product is compiled already)")
    params = jax.tree.map(lambda x: jnp.asarray(x) if _pytree.is_array(x)
                          else x, params)
    return _DatasetOperator(self, params, space)


def _batch_value(kind, params, batch):
  return _curvature.scalar_loss(kind, params.value, *batch)


def _batch_product(kind, params, batch, tangent, total, weight, *, space):
  """`total + weight * (curvature of one batch's loss) tangent`."""
  product = kind.linearize(params.value, space, *batch)[2]
  dtypes = [dtype for _, dtype in space.shapes]
  hv = _tree.widen(_curvature.checked_call(
      product, [t.astype(d) for t, d in zip(tangent, dtypes)]))
  return [a + h * jnp.asarray(weight).astype(a.dtype)
          for a, h in zip(total, hv)]


class _DatasetOperator(_base.LinearOperator):
  """The curvature of a :class:`DatasetLoss`: a Python loop over batches."""

  traceable = False

  def __init__(self, data: DatasetLoss, params: Any, space: _base.Space):
    self.data, self.params, self.space = data, params, space

  def apply(self, vector: list) -> list:
    total, count = self.data.accumulate(
        lambda t, kind, b, n: _programs.call(
            _batch_product, (kind, _pytree.Box(self.params), b, vector, t, n),
            space=self.space),
        [jnp.zeros_like(x) for x in vector])
    return [x / count for x in total]
