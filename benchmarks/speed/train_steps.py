"""The speed suite's training steps, written the ways the docs describe.

Every step is ``step(params, opt_state, batch, refresh=None)``, jitted with
``refresh`` static:

* ``"adam"``: ``optax.adam`` on ``jax.grad``;
* ``"fused"``: on refresh steps ``aho.value_grad_and_hessian`` (the loss,
  the gradient and the estimate from one jvp-over-grad pass) and
  ``update(..., hessian=...)``; on the others ``jax.grad`` and
  ``hessian_refresh=False``; the host decides (``update_interval=None``);
* ``"plain"``: ``jax.grad`` and the loss closure passed to ``update`` with
  ``hessian_refresh=refresh``, also decided on the host;
* ``"auto"``: ``jax.grad`` and the closure, one program, the optimizer's
  ``update_interval`` deciding at run time.

With ``fraction < 1`` or ``chunks > 1`` the closure is
``aho.sub_batch_value_fn(loss, batch, fraction, chunks=chunks)``.
"""

import functools

import jax
import optax

import adahessian_optax as aho

# Learning rates small enough that parameters barely move over the run, so
# that every round times the same computation.
LEARNING_RATE = 1e-5
STYLES = ("fused", "plain", "auto")


def adam():
  return optax.adam(LEARNING_RATE)


def adahessian(update_interval=None, n_samples=1):
  return aho.adahessian(LEARNING_RATE, key=0, update_interval=update_interval,
                        n_samples=n_samples)


def _closure(problem, batch, fraction, chunks):
  if fraction == 1 and chunks == 1:
    return functools.partial(problem.loss, batch=batch)
  return aho.sub_batch_value_fn(problem.loss, batch, fraction, chunks=chunks)


def train_step(problem, tx, style, *, fraction=1.0, chunks=1):
  """The jitted step of `style` (see the module docstring)."""
  if style not in ("adam",) + STYLES:
    raise ValueError(f"unknown step style {style!r}")

  def step(params, opt_state, batch, refresh=None):
    loss = functools.partial(problem.loss, batch=batch)
    if style == "adam":
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state,
                                     params)
    elif refresh is False:
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state,
                                     params, hessian_refresh=False)
    elif style == "fused":
      value_fn = _closure(problem, batch, fraction, chunks)
      _, grads, hessian = aho.value_grad_and_hessian(value_fn, params,
                                                     opt_state)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     hessian=hessian)
    else:
      value_fn = _closure(problem, batch, fraction, chunks)
      flag = {} if style == "auto" else {"hessian_refresh": True}
      updates, opt_state = tx.update(jax.grad(value_fn)(params), opt_state,
                                     params, value_fn=value_fn, **flag)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, static_argnames="refresh")


def refresh_pattern(style, k):
  """The `refresh` arguments of k consecutive steps."""
  if style == "adam" or style == "auto":
    return [None] * k
  return [True] + [False] * (k - 1)
