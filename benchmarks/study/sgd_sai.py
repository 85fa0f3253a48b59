"""SGD-SaI: SGD with momentum, learning rates scaled once at initialization.

Xu et al., `No More Adam: Learning Rate Scaling at Initialization is All You
Need <https://arxiv.org/abs/2412.11768>`_, 2024. No JAX implementation
exists; this one is the study's own (``benchmarks/study``), not part of
the library.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleBySaiState(NamedTuple):
  """State of :func:`scale_by_sai`.

  Attributes:
    count: number of ``update`` calls.
    gsnr: per leaf, the scalar learning-rate scale fixed at the first step.
    momentum: EMA of the gradient.
  """

  count: jax.Array
  gsnr: optax.Updates
  momentum: optax.Updates


def gradient_snr(g: jax.Array, eps: float) -> jax.Array:
  r"""A block's g-SNR, :math:`\|g\| / (\mathrm{std}(g) + \epsilon)`.

  The standard deviation is Bessel-corrected (``torch.std``'s default, as in
  the authors' code); a one-element block has none and gets 1.
  """
  g = g.astype(jnp.float32)
  if g.size < 2:
    return jnp.ones([], jnp.float32)
  return jnp.linalg.norm(g.ravel()) / (jnp.std(g, ddof=1) + eps)


def scale_by_sai(momentum: float = 0.9, eps: float = 1e-8,
                 normalize: bool = True) -> optax.GradientTransformation:
  r"""Momentum scaled per leaf by its gradient signal-to-noise ratio.

  At the first step each leaf (tensor) :math:`i` gets the scale
  :math:`s_i = \mathrm{gSNR}(g_{1,i})`, divided by :math:`\max_j s_j` when
  ``normalize`` (the paper); it is then fixed. With
  :math:`m_1 = g_1` and :math:`m_t = \mu m_{t-1} + (1 - \mu) g_t` the update
  is :math:`s_i m_{t,i}`.

  Args:
    momentum: :math:`\mu`.
    eps: added to the standard deviation.
    normalize: divide by the largest leaf's g-SNR (the paper); ``False`` is
      the authors' released code.

  Returns:
    An :class:`optax.GradientTransformation`.
  """

  def init_fn(params):
    return ScaleBySaiState(
        count=jnp.zeros([], jnp.int32),
        gsnr=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
        momentum=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0
    fresh = jax.tree.map(lambda g: gradient_snr(g, eps), updates)
    if normalize:
      top = jnp.max(jnp.stack(jax.tree.leaves(fresh)))
      fresh = jax.tree.map(lambda s: s / jnp.where(top > 0, top, 1.0), fresh)
    gsnr = jax.tree.map(lambda new, old: jnp.where(first, new, old), fresh,
                        state.gsnr)
    mom = jax.tree.map(
        lambda m, g: jnp.where(first, g, momentum * m + (1 - momentum) * g),
        state.momentum, updates)
    scaled = jax.tree.map(lambda s, m: (s * m).astype(m.dtype), gsnr, mom)
    return scaled, ScaleBySaiState(optax.safe_increment(state.count), gsnr,
                                   mom)

  return optax.GradientTransformation(init_fn, update_fn)


def sgd_sai(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
            weight_decay: float = 1e-2, eps: float = 1e-8,
            normalize: bool = True) -> optax.GradientTransformation:
  r"""SGD-SaI: :func:`scale_by_sai`, decoupled weight decay, learning rate.

  .. math::
    \theta_t = \theta_{t-1} - \eta_t (s \odot m_t + \lambda \theta_{t-1})

  Args:
    learning_rate: a scalar or an optax schedule (the authors' default is
      1e-2).
    momentum: :math:`\mu` (0.9).
    weight_decay: decoupled weight decay :math:`\lambda` (1e-2).
    eps: added to the standard deviation in the g-SNR.
    normalize: divide the scales by the largest (the paper).

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  return optax.chain(scale_by_sai(momentum, eps, normalize),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))
