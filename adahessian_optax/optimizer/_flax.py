"""Flax integration: the loss closure for NNX, a TrainState for Linen.

This module imports flax; ``adahessian_optax`` loads it only when one of its
names is first used, so the package itself does not need flax.
"""

from typing import Any, Callable, Mapping, Optional

import jax
import optax
from flax import nnx
from flax.nnx import filterlib
from flax.training import train_state

from adahessian_optax import _tree


def nnx_value_fn(
    loss_fn: Callable[..., Any],
    model: Any,
    *args: Any,
    wrt: filterlib.Filter = nnx.Param,
    has_aux: bool = False,
    graph: Optional[bool] = None,
    **kwargs: Any,
) -> Callable[[Any], jax.Array]:
  r"""Freezes an NNX loss into the closure ``params -> loss`` AdaHessian needs.

  Returns, for ``loss_fn`` :math:`\ell`,

  .. math::
    f(p) = \ell\bigl(\mathrm{model}[\theta \leftarrow p], \dots\bigr)

  where :math:`\theta` are the model's variables selected by ``wrt`` and
  everything else (batch statistics, RNG keys and counts, other variables,
  and any NNX objects among ``args`` and ``kwargs``, such as an
  :class:`flax.nnx.Rngs` passed at call time) is a snapshot of its value
  *now*. Each call of :math:`f` runs ``loss_fn`` on a fresh copy made from
  that snapshot, so

  * state the loss mutates (BatchNorm's running averages in training mode,
    RNG counts) is neither differentiated nor written back: the Hessian pass
    leaves the model as the gradient pass left it;
  * stateful NNX RNG streams restart from the snapshot, so Dropout draws the
    same mask as the first call of ``loss_fn`` after the snapshot. **Build the
    closure before** ``nnx.grad``/``nnx.value_and_grad`` runs (which advances
    the streams), and the gradient and the Hessian-vector product see the
    same mask.

  :class:`flax.nnx.Optimizer` hands ``tx.update`` the ``wrt``-filtered state
  of the model as a :class:`flax.nnx.State` of arrays and forwards keyword
  arguments, so the closure goes in as
  ``optimizer.update(model, grads, value_fn=value_fn)``. Use the same ``wrt``
  as the optimizer.

  Args:
    loss_fn: the loss, called as ``loss_fn(model, *args, **kwargs)``; it
      returns a float scalar, or ``(loss, aux)`` with ``has_aux=True``.
    model: the :class:`flax.nnx.Module` (or any NNX graph node) whose ``wrt``
      variables are the parameters.
    *args: positional arguments of ``loss_fn`` after the model.
    wrt: the NNX filter of the optimized variables (the ``wrt`` of
      :class:`flax.nnx.Optimizer`), :class:`flax.nnx.Param` by default.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    graph: NNX graph mode for the split, as in :func:`flax.nnx.split`
      (``None``: the current default).
    **kwargs: keyword arguments of ``loss_fn``. The names ``wrt``,
      ``has_aux`` and ``graph`` are taken by this function.

  Returns:
    A function of the ``wrt`` state (a :class:`flax.nnx.State` of arrays or
    of variables, shaped like ``nnx.state(model, wrt)``) returning the scalar
    loss.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import adahessian_optax as aho
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> optimizer = nnx.Optimizer(
    ...     model, aho.adahessian(learning_rate=0.1, key=0), wrt=nnx.Param)
    >>> value_fn = aho.nnx_value_fn(loss_fn, model, x, y)  # before the grad
    >>> loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    >>> bool(value_fn(nnx.state(model, nnx.Param)) == loss)
    True
    >>> _ = optimizer.update(model, grads, value_fn=value_fn)
    >>> bool(loss_fn(model, x, y) < loss)
    True
  """
  if isinstance(has_aux, jax.Array) or not isinstance(has_aux, bool):
    raise TypeError(f"has_aux must be a Python bool, got {has_aux!r}")
  if (nnx.graphlib.is_graph_node(loss_fn)
      and not nnx.graphlib.is_graph_node(model)):
    raise TypeError(
        "nnx_value_fn got the model first; the argument order is "
        "nnx_value_fn(loss_fn, model, *args), as in "
        "nnx.grad(loss_fn)(model, *args)")
  if not callable(loss_fn):
    raise TypeError(
        f"nnx_value_fn: loss_fn must be callable, got {type(loss_fn).__name__}"
        " (the argument order is nnx_value_fn(loss_fn, model, *args))")
  if not nnx.graphlib.is_graph_node(model):
    raise TypeError(
        "nnx_value_fn: model must be an NNX Module (or graph node), got "
        f"{type(model).__name__}; for Linen or plain pytrees, write the "
        "closure directly: lambda params: loss(params, ...)")

  in_model = filterlib.to_predicate(wrt)
  only_model_params = (
      lambda path, value: path[:1] == (0,) and in_model(path[1:], value))
  # Pure arrays, so that the snapshot does not follow later in-place updates
  # of the model's variables, and each merge creates fresh variables.
  graph_kw = {} if graph is None else {"graph": graph}
  graphdef, params, rest = nnx.split(
      (model, args, kwargs), only_model_params, ..., **graph_kw)
  params, rest = nnx.as_pure((params, rest))
  if 0 not in params:
    raise ValueError(
        f"nnx_value_fn: the filter wrt={wrt!r} selects no variable of the "
        "model; use the wrt of nnx.Optimizer (usually nnx.Param)")
  expected = jax.tree.structure(params[0])

  def value_fn(p):
    p = nnx.as_pure(p)
    if jax.tree.structure(p) != expected:
      raise ValueError(
          "the params given to the NNX loss closure do not match the "
          f"model's wrt={wrt!r} state (use the same wrt as nnx.Optimizer): "
          f"expected {_tree.short_treedef(expected)}, got "
          f"{_tree.short_treedef(jax.tree.structure(p))}")
    model_copy, args_copy, kwargs_copy = nnx.merge(
        graphdef, nnx.State({0: p}), rest)
    out = loss_fn(model_copy, *args_copy, **kwargs_copy)
    if has_aux:
      if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(
            "with has_aux=True, loss_fn must return (loss, aux), got "
            f"{type(out).__name__}")
      out = out[0]
    return out

  return value_fn


class TrainState(train_state.TrainState):
  r"""A Linen :class:`flax.training.train_state.TrainState` that forwards ``value_fn``.

  Flax's ``apply_gradients(*, grads, **kwargs)`` calls
  ``tx.update(grads, opt_state, params)`` and uses ``kwargs`` to replace
  fields, so an optimizer that needs the loss closure cannot get it. This
  subclass adds keyword arguments that go to ``tx.update``; everything else
  is the parent's method, unchanged (``step`` + 1, ``params`` and
  ``opt_state`` updated, ``**kwargs`` replaced, e.g. ``batch_stats``):

  .. math::
    (u, s') = \mathrm{tx.update}(g, s, \theta, \mathrm{value\_fn}=f, \dots),
    \qquad \theta' = \theta + u.

  For a model with mutable collections, let the loss return them as aux
  (``jax.value_and_grad(loss, has_aux=True)``), pass the new ones as
  ``batch_stats=...`` and a closure that drops them as ``value_fn``, so the
  Hessian pass updates nothing. Linen's Dropout takes an explicit key: use
  the same key in the gradient and in the closure.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import adahessian_optax as aho
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> state = aho.TrainState.create(
    ...     apply_fn=model.apply,
    ...     params=model.init(jax.random.key(0), x)["params"],
    ...     tx=aho.adahessian(learning_rate=0.1, key=0))
    >>> def loss_fn(params):
    ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
    >>> state = state.apply_gradients(grads=grads, value_fn=loss_fn)
    >>> int(state.step), bool(loss_fn(state.params) < loss)
    (1, True)
  """

  def apply_gradients(
      self,
      *,
      grads: Any,
      value_fn: Optional[Callable[[Any], jax.Array]] = None,
      hessian_refresh: Optional[bool] = None,
      hessian: Any = None,
      tx_kwargs: Optional[Mapping[str, Any]] = None,
      **kwargs: Any,
  ) -> "TrainState":
    """Applies ``grads`` like the parent, forwarding extra args to ``tx``.

    Args:
      grads: gradients shaped like ``params``.
      value_fn: the loss closure ``params -> scalar`` for ``tx.update``.
      hessian_refresh: a Python bool for AdaHessian's ``hessian_refresh``
        (mark it static under ``jax.jit``), or ``None``.
      hessian: the estimate from :func:`value_grad_and_hessian` (the fused
        step, with ``grads`` from the same call), or ``None``.
      tx_kwargs: further keyword arguments of ``tx.update``.
      **kwargs: fields to replace, as in the parent (e.g. ``batch_stats``).

    Returns:
      The new state.
    """
    extra = dict(tx_kwargs or {})
    for name, value in (("value_fn", value_fn),
                        ("hessian_refresh", hessian_refresh),
                        ("hessian", hessian)):
      if value is not None:
        if name in extra:
          raise ValueError(f"{name} was given both directly and in tx_kwargs")
        extra[name] = value
    if not extra:
      return super().apply_gradients(grads=grads, **kwargs)
    tx = self.tx
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
      raise TypeError(
          "TrainState.apply_gradients got extra arguments for tx.update "
          f"({sorted(extra)}), but tx is a plain GradientTransformation "
          "that takes none; use aho.adahessian or wrap it with optax.chain")

    def update(updates, opt_state, params=None):
      return tx.update(updates, opt_state, params, **extra)

    # The parent's method, run with a tx whose update has the extra arguments
    # bound, keeps its semantics (fp8 overwrite-with-gradient included).
    bound = self.replace(tx=optax.GradientTransformation(tx.init, update))
    new_state = super(TrainState, bound).apply_gradients(grads=grads, **kwargs)
    return new_state.replace(tx=tx)
