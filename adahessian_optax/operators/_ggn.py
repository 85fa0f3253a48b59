r"""The generalized Gauss-Newton of a loss of model outputs, and its losses.

A loss :math:`L(\theta) = \ell(f(\theta))` given as its two halves: the
model's outputs :math:`f` (``output_fn``) and the loss of those outputs
:math:`\ell` (``output_loss``). Its GGN :math:`G = J^\top (\nabla^2 \ell) J`
is multiplied without second derivatives through the network: a jvp of
:math:`f`, the small output-space product, and the transposed jvp.

The negative log-likelihoods here (:class:`SoftmaxCrossEntropy`,
:class:`SquaredError`) can also draw labels from the model's own
predictive distribution, which the Gauss-Newton-Bartlett estimator needs.
"""

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

from adahessian_optax import _pytree
from adahessian_optax import _tree
from adahessian_optax.operators import _curvature


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy:
  r"""The mean softmax cross-entropy of logits, as an ``output_loss``.

  .. math::
    \ell(z) = \frac1N \sum_{n=1}^N \Big(\log \sum_c e^{z_{n,c}}
      - \sum_c y_{n,c} z_{n,c}\Big), \qquad
    \nabla^2 \ell = \frac1N\, \mathrm{blockdiag}_n\big(\mathrm{diag}(p_n)
      - p_n p_n^\top\big),

  over the :math:`N` positions of the logits (every axis but the last, the
  classes: examples, or examples times tokens). Its GGN is the Fisher of
  the model's categorical distribution.

  Args:
    labels: integer class indices, shaped like the logits without their
      last axis, or class probabilities (one-hot or soft), shaped like the
      logits.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = aho.SoftmaxCrossEntropy(jnp.array([0, 1]))
    >>> print(jnp.round(loss(jnp.zeros((2, 2))), 4))   # log 2
    0.6931
  """

  labels: jax.Array
  # Trailing axes of the outputs that are not positions (the classes).
  class_axes: ClassVar[int] = 1

  def __call__(self, logits: jax.Array) -> jax.Array:
    logits = _check_outputs("SoftmaxCrossEntropy", logits)
    log_p = jax.nn.log_softmax(logits.astype(_wide(logits.dtype)), axis=-1)
    labels = jnp.asarray(self.labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
      if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"SoftmaxCrossEntropy: integer labels of shape {labels.shape} "
            f"do not match logits of shape {logits.shape} (expected "
            f"{logits.shape[:-1]}: one class index per position)")
      picked = jnp.take_along_axis(log_p, labels[..., None], axis=-1)
      return -jnp.mean(picked)
    if labels.shape != logits.shape:
      raise ValueError(
          f"SoftmaxCrossEntropy: probability labels of shape {labels.shape} "
          f"do not match logits of shape {logits.shape}")
    return -jnp.mean(jnp.sum(labels.astype(log_p.dtype) * log_p, axis=-1))

  def num_positions(self, logits: jax.Array) -> int:
    """N: the independent positions a label is drawn for."""
    return max(1, int(logits.size // logits.shape[-1]))

  def sample(self, key: jax.Array, logits: jax.Array) -> "SoftmaxCrossEntropy":
    """The same loss with labels drawn from ``softmax(logits)``.

    By inverse CDF, one uniform number per position: Gumbel-max
    (``jax.random.categorical``) takes a logarithm per class, 13 ms against
    2.7 ms for 16 x 64 x 512 logits on one CPU core.
    """
    logits = jax.lax.stop_gradient(logits)
    logits = logits.astype(_wide(logits.dtype))
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cumulative = jnp.cumsum(weights, axis=-1)
    u = jax.random.uniform(key, logits.shape[:-1] + (1,), cumulative.dtype)
    labels = jnp.sum(cumulative <= u * cumulative[..., -1:], axis=-1,
                     dtype=jnp.int32)
    return SoftmaxCrossEntropy(jnp.minimum(labels, logits.shape[-1] - 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SquaredError:
  r"""Half the mean squared error, as an ``output_loss``.

  .. math::
    \ell(f) = \frac{1}{2N} \sum_{n=1}^N (f_n - y_n)^2, \qquad
    \nabla^2 \ell = \frac1N I,

  over the :math:`N` entries of the outputs: the negative log-likelihood of
  a Gaussian of unit variance, up to a constant (``optax.l2_loss`` averaged).
  Its GGN is :math:`\frac1N J^\top J`, the Fisher of that Gaussian.

  Args:
    targets: the regression targets, shaped like the outputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> print(aho.SquaredError(jnp.zeros(2))(jnp.array([1.0, 3.0])))
    2.5
  """

  targets: jax.Array
  class_axes: ClassVar[int] = 0

  def __call__(self, outputs: jax.Array) -> jax.Array:
    outputs = _check_outputs("SquaredError", outputs)
    if jnp.shape(self.targets) != outputs.shape:
      raise ValueError(
          f"SquaredError: targets of shape {jnp.shape(self.targets)} do not "
          f"match outputs of shape {outputs.shape}")
    wide = _wide(outputs.dtype)
    diff = outputs.astype(wide) - jnp.asarray(self.targets).astype(wide)
    return 0.5 * jnp.mean(diff ** 2)

  def num_positions(self, outputs: jax.Array) -> int:
    """N: the independent entries a target is drawn for."""
    return max(1, int(outputs.size))

  def sample(self, key: jax.Array, outputs: jax.Array) -> "SquaredError":
    """The same loss with targets drawn from ``N(outputs, I)``."""
    outputs = jax.lax.stop_gradient(outputs).astype(_wide(outputs.dtype))
    return SquaredError(outputs + jax.random.normal(key, outputs.shape,
                                                    outputs.dtype))


def _wide(dtype: Any) -> Any:
  return _tree.at_least_float32(dtype)


def _check_outputs(owner: str, outputs: Any) -> jax.Array:
  if not isinstance(outputs, (jax.Array, jax.core.Tracer)) and not hasattr(
      outputs, "dtype"):
    raise TypeError(
        f"{owner}: output_fn must return one array of outputs, got "
        f"{type(outputs).__name__}")
  outputs = jnp.asarray(outputs)
  if not jnp.issubdtype(outputs.dtype, jnp.floating):
    raise TypeError(
        f"{owner}: the outputs must be floating-point, got {outputs.dtype}")
  if outputs.ndim == 0:
    raise ValueError(f"{owner}: the outputs must have at least one axis")
  return outputs


SAMPLEABLE = (SoftmaxCrossEntropy, SquaredError)


@_pytree.dataclass
class GGN(_curvature.Curvature):
  """A loss given as ``output_loss(output_fn(params))``; made by :func:`ggn`.

  Called on params (and, inside a :class:`DatasetLoss`, a batch) it is the
  loss; its curvature is the GGN, and the Gauss-Newton-Bartlett estimator
  reads its two halves.

  Attributes:
    output_fn: ``params -> outputs`` (or ``(params, batch) -> outputs``).
    output_loss: ``outputs -> scalar`` (or ``(outputs, batch) -> scalar``).
  """

  output_fn: Callable[..., Any]
  output_loss: Callable[..., Any]

  def __call__(self, params: Any, *batch: Any) -> jax.Array:
    return self.output_loss(self.output_fn(params, *batch), *batch)

  def linearize(self, params, space, *batch, axis_name=None):
    """One forward pass (:func:`jax.linearize` of ``output_fn``) keeps its
    residuals; each product is a jvp, an output-space Hessian product and
    the transposed jvp."""
    leaves = space.select(params)
    with _curvature.forward_mode():
      outputs, jvp = jax.linearize(
          lambda ls: self.output_fn(space.replace(params, ls), *batch),
          leaves)
    if not hasattr(outputs, "dtype"):
      raise TypeError(
          "ggn: output_fn must return one array of outputs, got "
          f"{type(outputs).__name__}")
    output_loss = _as_partial(
        lambda o: _scalar("ggn", self.output_loss(o, *batch)), outputs)
    _check_curvature(output_loss, outputs)
    value, cotangent = jax.value_and_grad(output_loss)(outputs)
    vjp = jax.linear_transpose(jvp, leaves)
    grad = vjp(cotangent.astype(outputs.dtype))[0]
    if axis_name is not None:
      value = jax.lax.pmean(value, axis_name)
      grad = jax.lax.pmean(grad, axis_name)
    return value, grad, jax.tree_util.Partial(_ggn_product, jvp, vjp,
                                              output_loss, outputs)


def ggn(output_fn: Callable[..., Any],
        output_loss: Callable[..., Any]) -> GGN:
  r"""A loss whose curvature is its generalized Gauss-Newton matrix.

  For :math:`L(\theta) = \ell(f(\theta))` with model outputs :math:`f` and
  Jacobian :math:`J = \partial f / \partial \theta`,

  .. math::
    H = J^\top (\nabla^2 \ell)\, J + \sum_k \frac{\partial \ell}{\partial f_k}
        \nabla^2 f_k, \qquad G = J^\top (\nabla^2 \ell)\, J.

  :math:`G` drops the second term: it is positive semi-definite wherever
  :math:`\ell` is convex in the outputs (softmax cross-entropy, squared
  error), equals :math:`H` for a model linear in :math:`\theta`, and is the
  Fisher information for the losses that are negative log-likelihoods
  (:class:`SoftmaxCrossEntropy`, :class:`SquaredError`). A product
  :math:`Gv` is a jvp of :math:`f`, an output-space product with
  :math:`\nabla^2 \ell`, and a transposed jvp: no derivative of second
  order through the network.

  Pass the result wherever the analysis tools take a loss closure
  (:func:`hessian_trace`, :func:`hessian_eigenvalues`,
  :func:`hessian_spectrum`, ...): they analyse :math:`G` instead of
  :math:`H`. Over a dataset, give ``output_fn(params, batch)`` and
  ``output_loss(outputs, batch)`` and wrap it in :class:`DatasetLoss`. As
  ``value_fn`` of an optimizer with :func:`gnb_estimator`, ``output_loss``
  must be a :class:`SoftmaxCrossEntropy` or :class:`SquaredError`, which
  can draw labels from the model.

  Args:
    output_fn: ``params -> outputs``, one floating-point array (logits for
      a classifier).
    output_loss: ``outputs -> scalar``, the loss of the outputs: a
      :class:`SoftmaxCrossEntropy`, a :class:`SquaredError`, or any
      function (convex in the outputs for a PSD :math:`G`).

  Returns:
    A :class:`GGN`: callable ``params -> loss``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> loss = aho.ggn(lambda w: x @ w, aho.SquaredError(jnp.zeros(2)))
    >>> values, _, _ = aho.hessian_eigenvalues(loss, jnp.zeros(2), key=0, k=2)
    >>> print(*(f"{v:.3f}" for v in values))  # X^T X / 2: the Hessian's
    14.933 0.067

  References:
    Schraudolph, `Fast curvature matrix-vector products for second-order
    gradient descent <https://doi.org/10.1162/08997660260028683>`_, Neural
    Computation 2002.

    Martens, `New insights and perspectives on the natural gradient method
    <https://arxiv.org/abs/1412.1193>`_, JMLR 2020.
  """
  if not callable(output_fn):
    raise TypeError(
        "ggn: output_fn must be a callable params -> outputs, got "
        f"{type(output_fn).__name__}")
  if not callable(output_loss):
    raise TypeError(
        "ggn: output_loss must be a callable outputs -> scalar loss (e.g. "
        f"aho.SoftmaxCrossEntropy(labels)), got {type(output_loss).__name__}")
  return GGN(output_fn, output_loss)


def _scalar(owner: str, value: Any) -> jax.Array:
  if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value),
                                                  jnp.floating):
    raise TypeError(
        f"{owner}: output_loss must return a floating-point scalar, got "
        f"shape {jnp.shape(value)} and dtype {jnp.result_type(value)}")
  return value


def _as_partial(fn: Callable[[jax.Array], jax.Array],
                outputs: jax.Array) -> jax.tree_util.Partial:
  """`fn` with the arrays it captures as pytree leaves (so that a jitted
  function can return it without leaking them)."""
  closed = jax.make_jaxpr(fn)(outputs)
  return jax.tree_util.Partial(
      functools.partial(eval_closed, closed.jaxpr), closed.consts)


def eval_closed(jaxpr, consts, *args):
  """The single output of the jaxpr `jaxpr` with its captured `consts`."""
  return jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, consts))(*args)[0]


def _check_curvature(output_loss: Callable, outputs: jax.Array) -> None:
  """Raises when the output loss's Hessian is zero by construction.

  A loss linear in the outputs (a cross-entropy written on log-probabilities
  that ``output_fn`` already normalised, say) has no second derivative, so
  its GGN is zero; seen in the product's trace, where the tangent of the
  output-space gradient does not depend on the tangent at all.
  """
  closed = jax.make_jaxpr(
      lambda o, u: jax.jvp(jax.grad(output_loss), (o,), (u,))[1])(
          outputs, outputs)
  tangent = closed.jaxpr.invars[1]
  reached = {tangent}
  for eqn in closed.jaxpr.eqns:
    if any(not isinstance(v, jax_core.Literal) and v in reached
           for v in eqn.invars):
      reached.update(eqn.outvars)
  if not any(v in reached for v in closed.jaxpr.outvars
             if not isinstance(v, jax_core.Literal)):
    raise ValueError(
        "ggn: output_loss has no curvature in the outputs (its second "
        "derivative is zero: it is linear in them), so the GGN is zero. "
        "This happens when output_fn already applies log_softmax and "
        "output_loss picks the log-probabilities of the labels: let "
        "output_fn return the logits and use aho.SoftmaxCrossEntropy(labels) "
        "(or put the normalisation in output_loss)")


def _ggn_product(jvp, vjp, output_loss, outputs, v: list) -> list:
  u = jvp(v)
  hu = jax.jvp(jax.grad(output_loss), (outputs,), (u,))[1]
  return vjp(hu.astype(u.dtype))[0]
