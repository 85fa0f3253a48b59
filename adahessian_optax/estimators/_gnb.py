r"""The Gauss-Newton-Bartlett estimator of the GGN diagonal (Sophia-G's).

For a loss given as :func:`ggn` ``(output_fn, output_loss)`` whose
``output_loss`` is a negative log-likelihood it can sample from
(:class:`SoftmaxCrossEntropy`, :class:`SquaredError`): draw labels from the
model, take the gradient of the loss on them, and square it. One forward
pass and one more backward pass, no second derivative; the estimate is
never negative. Its configuration is a :class:`GaussNewtonBartlett`; the
key lives in the estimator's state (see
:mod:`adahessian_optax.estimators._base`).
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from adahessian_optax import _checks
from adahessian_optax import _probes
from adahessian_optax import _tree
from adahessian_optax.estimators import _base
from adahessian_optax.operators import _base as _operators
from adahessian_optax.operators import _curvature
from adahessian_optax.operators import _ggn


@dataclasses.dataclass(frozen=True)
class GaussNewtonBartlett(_base.Estimator):
  """The Gauss-Newton-Bartlett estimator: its configuration.

  Attributes:
    n_samples: independent label draws averaged per estimate.
    fraction: the share of the batch (its leading axis) labels are drawn
      for.
    axis_name: the named axis over which estimates are averaged, or ``None``.
  """

  n_samples: int = 1
  fraction: float = 1.0
  axis_name: Optional[str] = None

  def estimate(self, value_fn, params, key, *, value_and_grad):
    """With ``value_and_grad``, also the value and gradient on the true
    labels, their cotangent pulled back beside the draws' (`_pull_back`);
    without, the estimate's value and grad are None."""
    return _estimate(self, value_fn, params, key, value_and_grad)


def _configured(n_samples: Any, fraction: Any, axis_name: Optional[str],
                owner: str) -> GaussNewtonBartlett:
  if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
      or not 0 < fraction <= 1):
    raise ValueError(
        f"{owner}: fraction must be a number in (0, 1], got {fraction!r}")
  return GaussNewtonBartlett(_base.check_n_samples(n_samples),
                             float(fraction), _base.check_axis_name(axis_name))


def _check_loss(value_fn: Any, owner: str) -> _ggn.GGN:
  """`value_fn` as a GGN loss whose output loss can draw labels."""
  if not isinstance(value_fn, _ggn.GGN):
    raise TypeError(
        f"{owner}: the Gauss-Newton-Bartlett estimator needs the model's "
        "outputs and a loss it can draw labels from: pass value_fn="
        "aho.ggn(output_fn, aho.SoftmaxCrossEntropy(labels)) (or "
        "aho.SquaredError(targets)) instead of the plain loss closure, got "
        f"{type(value_fn).__name__}")
  if not hasattr(value_fn.output_loss, "sample"):
    names = " or ".join(f"aho.{c.__name__}" for c in _ggn.SAMPLEABLE)
    raise TypeError(
        f"{owner}: cannot draw labels from the output loss "
        f"{type(value_fn.output_loss).__name__}; the Gauss-Newton-Bartlett "
        f"estimator needs a negative log-likelihood it can sample: {names} "
        "(for another loss, use aho.hutchinson_estimator)")
  return value_fn


def draw(output_loss: Any, key_data: jax.Array, outputs: jax.Array) -> Any:
  """`output_loss` with its labels drawn from the model at `outputs`."""
  outputs = jax.lax.stop_gradient(outputs)
  typed = jax.random.wrap_key_data(_probes.random_words(key_data, 2),
                                   impl="threefry2x32")
  return output_loss.sample(typed, outputs)


def _keys(key_data: jax.Array, n: int) -> jax.Array:
  """`n` raw keys like `key_data`, one draw."""
  size = key_data.size
  return _probes.random_words(key_data, n * size).reshape(
      (n,) + key_data.shape)


def sample_keys(state: GaussNewtonBartlett, key_data: jax.Array) -> list:
  """The raw key of each label draw; on a named axis, this device's own."""
  if state.axis_name is not None:
    # Replicas share the state's key; their labels must be independent.
    devices = jax.lax.axis_size(state.axis_name)
    key_data = _keys(key_data, devices)[jax.lax.axis_index(state.axis_name)]
  return list(_keys(key_data, state.n_samples))


def _head_size(state: GaussNewtonBartlett, output_loss: Any,
               outputs: jax.Array) -> Optional[int]:
  """The number of leading examples labels are drawn for (None: all)."""
  if state.fraction == 1:
    return None
  position_axes = outputs.ndim - output_loss.class_axes
  if position_axes < 1:
    raise ValueError(
        f"fraction={state.fraction} draws labels for the leading examples of "
        f"the outputs, but outputs of shape {outputs.shape} have no example "
        "axis")
  n = outputs.shape[0]
  return max(1, min(n, round(state.fraction * n)))


def _cotangent(loss_of_outputs: Callable[[jax.Array], jax.Array],
               outputs: jax.Array, axis_name: Optional[str]):
  """`(value, d loss / d outputs)`, in the outputs' dtype.

  Of the axis mean: pulled back through the model and then averaged
  (``_curvature.axis_mean``), it gives the mean gradient under ``pmap`` and
  under ``shard_map`` (whose autodiff sums over the axis) alike.
  """
  def mean_loss(o):
    value = loss_of_outputs(o)
    return value if axis_name is None else jax.lax.pmean(value, axis_name)
  value, cotangent = jax.value_and_grad(mean_loss)(outputs)
  return value, cotangent.astype(outputs.dtype)


def _sampled_cotangents(output_loss, outputs, state, key_data):
  """`(cotangents, n)`: one per label draw, each like `outputs`, and the
  number of positions N the draws cover (over all devices)."""
  m = _head_size(state, output_loss, outputs)
  head = outputs if m is None else outputs[:m]
  n = output_loss.num_positions(head)
  if state.axis_name is not None:
    n *= jax.lax.axis_size(state.axis_name)
  cotangents = []
  for key in sample_keys(state, key_data):
    sampled = draw(output_loss, key, head)
    c = _cotangent(sampled, head, state.axis_name)[1]
    if m is not None and m < outputs.shape[0]:
      c = jnp.concatenate([c, jnp.zeros((outputs.shape[0] - m,)
                                        + outputs.shape[1:], c.dtype)])
    cotangents.append(c)
  return cotangents, n


def _outputs(loss: _ggn.GGN, params: Any) -> jax.Array:
  outputs = _checks.call_value_fn(loss.output_fn, params)
  if not hasattr(outputs, "dtype") or not jnp.issubdtype(outputs.dtype,
                                                          jnp.floating):
    raise TypeError(
        "gnb_estimator: output_fn must return one floating-point array of "
        f"outputs, got {getattr(outputs, 'dtype', type(outputs).__name__)}")
  if outputs.ndim == 0:
    raise ValueError("gnb_estimator: the outputs must have at least one axis")
  return outputs


def _pull_back(vjp: Callable, cotangents: list,
               batched: Optional[bool] = None,
               batch_bytes: int = 1 << 26) -> list:
  """`vjp(c)` for each cotangent, all in one program.

  Batched (one :func:`jax.vmap` of `vjp`) for outputs with a sequence axis
  (rank 3 and more, a language model's), one call each otherwise. Measured
  on XLA:CPU, one core, for a true and a sampled cotangent, in gradients:
  the benchmarks' Transformer 1.36 batched against 1.73 (a char-level LM
  1.35 against 1.62: the backward of LayerNorm, GELU and attention reads
  its residuals once for both), their MLP 2.15 against 1.63 and CNN 1.80
  against 1.62 (the batched weight gradients come out transposed, and take
  more memory). On a GPU both were within 3% of each other.

  Cotangents over `batch_bytes` (64 MiB) each are pulled back one call
  each whatever their rank: a large vocabulary's logits (GPT-2's 50257
  classes on 4 x 1024 tokens are 823 MB in float32), whose stacked copy
  and batched backward cost more memory than batching saves time (GPT-2
  small's fused GNB step, ``benchmarks/speed/memory_scale.py``: 1.40 to
  1.32 times AdamW's temporary bytes on one device, 1.40 to 1.26 per device
  on eight).
  """
  if batched is None:
    c = cotangents[0]
    batched = (c.ndim >= 3
               and c.size * jnp.dtype(c.dtype).itemsize <= batch_bytes)
  if len(cotangents) == 1 or not batched:
    return [vjp(c)[0] for c in cotangents]
  stacked = jax.vmap(vjp)(jnp.stack(cotangents))[0]
  return [[leaf[i] for leaf in stacked] for i in range(len(cotangents))]


def _estimate(state: GaussNewtonBartlett, value_fn: Any, params: Any,
              draw_key: jax.Array, value_and_grad: bool) -> _base.Estimate:
  loss = _check_loss(value_fn, "gnb_estimator")
  space = _operators.Space.of(params)
  leaves = space.select(params)
  outputs, vjp = jax.vjp(
      lambda ls: _outputs(loss, space.replace(params, ls)), leaves)
  sampled, n = _sampled_cotangents(loss.output_loss, outputs, state, draw_key)
  value = grad = None
  if value_and_grad:
    value, true = _cotangent(loss.output_loss, outputs, state.axis_name)
    grad, *pulled = _pull_back(vjp, [true] + sampled)
    value, grad = _curvature.axis_mean((value, grad), state.axis_name)
  else:
    pulled = _pull_back(vjp, sampled)
  diagonal = None
  for g in pulled:
    g = _curvature.axis_mean(_tree.widen(g), state.axis_name)
    term = [x * x for x in g]
    diagonal = term if diagonal is None else [
        a + b for a, b in zip(diagonal, term)]
  scale = n / state.n_samples
  diagonal = [scale * d for d in diagonal]
  zeros = jax.tree.map(jnp.zeros_like, params)
  return _base.Estimate(
      value=value,
      grad=None if grad is None else space.replace(zeros, grad),
      diagonal=space.replace(zeros, diagonal))


def gnb_diagonal(
    value_fn: _ggn.GGN,
    params: Any,
    key: Any,
    *,
    n_samples: int = 1,
    fraction: float = 1.0,
    axis_name: Optional[str] = None,
) -> _base.Estimate:
  r"""Estimates the GGN diagonal by Gauss-Newton-Bartlett (Sophia-G's).

  For a loss :math:`L(\theta) = \ell(f(\theta))`, a mean over :math:`N`
  positions of a negative log-likelihood of the model's outputs :math:`f`
  (examples, or examples times tokens for a language model), draw labels
  :math:`\hat y_n \sim p(y \mid f_n)` independently for every position, take
  the gradient of the loss on them, :math:`\hat g = \nabla_\theta \hat\ell
  (f(\theta))`, and return

  .. math::
    \widehat{\mathrm{diag}}(G) = \frac1S \sum_{s=1}^{S} N\, \hat g_s \odot
      \hat g_s, \qquad
    \mathbb{E}\, \widehat{\mathrm{diag}}(G) = \mathrm{diag}(G), \quad
    G = J^\top (\nabla^2 \ell)\, J,

  unbiased because the score of a sampled label has zero mean (Bartlett's
  identity) and covariance :math:`N^2 \nabla^2 \ell` per position, and the
  positions are independent. :math:`G` is the generalized Gauss-Newton
  matrix (:func:`ggn`), here the Fisher; the estimate is never negative. For
  a model linear in :math:`\theta`, :math:`G` is the Hessian.

  One forward pass and one backward pass per draw on top of it: no second
  derivative. The value and the gradient on the true labels come from the
  same forward pass, their backward pass in the same program as the draws':
  batched (:func:`jax.vmap` of one :func:`jax.vjp`) for outputs with a
  sequence axis, where that was the faster on CPU, one ``vjp`` call each
  otherwise (``docs/estimators.md``). Labels for
  :class:`SoftmaxCrossEntropy` are drawn by inverse CDF from one uniform
  number per position; targets for :class:`SquaredError` from
  :math:`\mathcal N(f, I)`. Non-float leaves of ``params`` get zeros.

  Args:
    value_fn: the loss as ``aho.ggn(output_fn, output_loss)`` with
      ``output_loss`` a :class:`SoftmaxCrossEntropy` or a
      :class:`SquaredError`: the estimator needs the outputs to draw labels
      from.
    params: the pytree at which to estimate the diagonal.
    key: an int seed or a JAX PRNG key for the labels; the same key draws
      the same labels.
    n_samples: independent label draws averaged, :math:`S`.
    fraction: draw labels for the first :math:`m = \mathrm{round}(f B)` of
      the :math:`B` examples along the outputs' leading axis only (as Sophia
      estimates on a sub-batch), :math:`N` counting their positions; the
      other examples' sampled cotangent is zero. Unbiased for the GGN of
      those examples' mean loss. It does not reduce the compute: the
      backward pass still runs on the whole batch (``output_fn`` sees the
      whole batch).
    axis_name: inside ``pmap`` or ``shard_map``, the name of the data axis:
      each device draws its own labels (from the shared key and its axis
      index), the sampled gradients are averaged over the axis and
      :math:`N` counts the positions of all devices, so that the estimate is
      that of the whole batch; the value and the gradient are averaged too.

  Returns:
    An :class:`Estimate` ``(value, grad, diagonal)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> loss = aho.ggn(lambda w: x @ w, aho.SquaredError(jnp.zeros(3)))
    >>> print(jnp.sum(x ** 2, axis=0) / 3)   # diag(X^T X) / N, the Hessian's
    [0.6666667 1.6666667]
    >>> keys = jax.random.split(jax.random.key(0), 4000)
    >>> draws = jax.jit(jax.vmap(
    ...     lambda k: aho.gnb_diagonal(loss, jnp.zeros(2), k).diagonal))(keys)
    >>> print(jnp.round(jnp.mean(draws, axis=0), 1), jnp.all(draws >= 0))
    [0.7 1.7] True

  References:
    Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023
    (Algorithm 2).

    Martens, `New insights and perspectives on the natural gradient method
    <https://arxiv.org/abs/1412.1193>`_, JMLR 2020.
  """
  _checks.check_params("gnb_diagonal", params)
  _check_loss(value_fn, "gnb_diagonal")
  state = _base.EstimatorState(
      _probes.key_data(key, "gnb_diagonal"),
      _configured(n_samples, fraction, axis_name, "gnb_diagonal"))
  return _base.next_estimate(state, value_fn, params, value_and_grad=True)[0]


def gnb_estimator(
    key: Any = None,
    *,
    n_samples: int = 1,
    fraction: float = 1.0,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The Gauss-Newton-Bartlett estimator of the GGN diagonal, configured once.

  Sophia-G's curvature, for :func:`optax.contrib.sophia` as
  ``hessian_diagonal_fn`` and for :func:`adahessian` as ``estimator``. Its
  ``init`` returns a :class:`EstimatorState` holding the key and this
  configuration; its ``update(updates, state, params, *, value_fn)``
  ignores ``updates`` and returns
  :math:`\frac1S \sum_s N\, \hat g_s \odot \hat g_s` (see
  :func:`gnb_diagonal`) cast to the params' dtypes, splitting its key on
  every call. ``value_fn`` (or ``obj_fn``, the name Sophia passes it under)
  must be the loss as ``aho.ggn(output_fn, output_loss)``, with
  ``output_loss`` a :class:`SoftmaxCrossEntropy` or a
  :class:`SquaredError`; a :class:`GGN` is callable ``params -> loss``, so
  the same object serves where a plain closure is needed. On its own the
  update costs one forward and one backward pass; in AdaHessian's fused step
  (:func:`value_grad_and_hessian`) the forward is shared with the gradient.

  **The learning rate.** The GNB estimate of the GGN diagonal is far
  smaller than Hutchinson's ``|z * Hz|`` (tens of times early in training,
  orders of magnitude later, as the model grows confident), so AdaHessian
  takes far larger steps with it at the same rate. At the rates tuned for
  Hutchinson's estimate it trains nothing, and silently: on a 10-class
  problem the loss stays near ln 10 and nothing is NaN. Divide
  Hutchinson's tuned rate by about 30 (the tuned rate was 1/32 of it on
  both tasks of ``docs/study.md``) and tune around it, or keep the rate
  and pass ``clip_threshold=0.1`` to :func:`adahessian` (with it, both
  tasks trained at Hutchinson's tuned rate). Watch the training loss of the
  first epoch: a loss that does not leave its first value means the rate
  is too large. Measured by ``python -m benchmarks.study.gnb_rate``.

  Args:
    key: an int seed or a JAX PRNG key (required).
    n_samples: independent label draws per estimate.
    fraction: the share of the batch labels are drawn for (see
      :func:`gnb_diagonal`).
    axis_name: named axis over which estimates are averaged.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    >>> loss = aho.ggn(lambda w: x @ w, aho.SoftmaxCrossEntropy(
    ...     jnp.array([0, 1, 0])))
    >>> tx = optax.contrib.sophia(
    ...     0.1, hessian_diagonal_fn=aho.gnb_estimator(key=0))
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              obj_fn=loss)
    ...   return optax.apply_updates(params, updates), state
    >>> params = jnp.zeros((2, 2))
    >>> state = tx.init(params)
    >>> for _ in range(20):
    ...   params, state = step(params, state)
    >>> print(loss(params) < 0.5 * loss(jnp.zeros((2, 2))))
    True

  References:
    Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023.

    Martens, `New insights and perspectives on the natural gradient method
    <https://arxiv.org/abs/1412.1193>`_, JMLR 2020.
  """
  if key is None:
    raise ValueError(
        "gnb_estimator needs `key`, an int seed or a jax.random.key, to draw "
        "its labels (no seed is chosen for you), e.g. key=0.")
  return _base.transformation(
      _configured(n_samples, fraction, axis_name, "gnb_estimator"), key,
      "gnb_estimator")
