"""Hutchinson's estimator of the Hessian diagonal, one jvp-over-grad pass."""

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import optax.tree

from adahessian_optax import _checks
from adahessian_optax import _compose
from adahessian_optax import _tree


def _seed(words: jax.Array) -> jax.Array:
  """Raw key data as a Philox state: four uint32 words (zero-padded)."""
  words = words.reshape(-1).astype(jnp.uint32)
  if words.size < 4:
    words = jnp.concatenate([words, jnp.zeros(4 - words.size, jnp.uint32)])
  return words[:4]


def random_words(key_data: jax.Array, n: int) -> jax.Array:
  """`n` random uint32 words from XLA's Philox generator, seeded by key data.

  One RngBitGenerator op. JAX's threefry lowers to a while loop on CPU, and a
  step with such loops in it lost XLA:CPU's concurrent execution: a small
  CNN's Hessian pass ran 1.25x slower on two threads with one loop per
  parameter leaf. Under ``vmap`` each key draws its own words, exactly as in
  a loop (XLA's own batching rule would use the first key for all).
  """

  @jax.custom_batching.custom_vmap
  def words(seed):
    return jax.lax.rng_bit_generator(
        seed, (n,), jnp.uint32,
        algorithm=jax.lax.RandomAlgorithm.RNG_PHILOX)[1]

  @words.def_vmap
  def _(axis_size, in_batched, seeds):  # pylint: disable=unused-argument
    return jax.lax.map(words, seeds), True

  return words(_seed(key_data))


def split_key_data(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(next, probe)`: two new raw keys like `key_data`, from one draw."""
  size = math.prod(key_data.shape)
  words = random_words(key_data, 2 * size)
  return (words[:size].reshape(key_data.shape),
          words[size:].reshape(key_data.shape))


def _bits(key_data: jax.Array, size: int) -> jax.Array:
  """`size` independent 0/1 bits, 32 from each random word, as uint32.

  Every bit of the generator's output is a fair coin, so ``2 * bits - 1`` is
  exactly Rademacher, from 32x fewer words than ``jax.random.rademacher``
  draws (one per entry); on CPU the generator is the cost, and for a
  1M-parameter MLP that was more than half a gradient evaluation.
  """
  words = random_words(key_data, -(-size // 32))
  return ((words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
          ).reshape(-1)[:size]


def probes(key_data: jax.Array, leaves: list, distribution: str,
           n_samples: int) -> list:
  """`n_samples` probes, each a list like `leaves`, from raw key data.

  Rademacher probes all come from a single draw of random bits; Gaussian ones
  from JAX's threefry, one key per probe and leaf.
  """
  if distribution != "rademacher":
    typed = jax.random.wrap_key_data(_seed(key_data)[:2],
                                     impl="threefry2x32")
    return [optax.tree.random_like(k, leaves, jax.random.normal)
            for k in jax.random.split(typed, n_samples)]
  sizes = [math.prod(x.shape) for x in leaves]
  bits = _bits(key_data, n_samples * sum(sizes))
  out, start = [], 0
  for _ in range(n_samples):
    z = []
    for x, size in zip(leaves, sizes):
      piece = bits[start:start + size].reshape(x.shape).astype(x.dtype)
      z.append(2 * piece - 1)
      start += size
    out.append(z)
  return out


_DISTRIBUTIONS = ("gaussian", "rademacher")


def as_key(key: Any, owner: str) -> jax.Array:
  """Returns a typed PRNG key from an int seed, a typed key or raw key data."""
  if key is None:
    raise ValueError(
        f"{owner} needs `key`, an int seed or a jax.random.key, to draw its "
        "Hutchinson probes (no seed is chosen for you), e.g. key=0.")
  if isinstance(key, bool):
    raise TypeError(f"{owner}: key must be an int seed or a JAX key, got {key!r}")
  if isinstance(key, numbers.Integral):
    return jax.random.key(key)
  dtype = getattr(key, "dtype", None)
  shape = getattr(key, "shape", None)
  if dtype is not None:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if shape != ():
        raise ValueError(f"{owner}: key must be a single key, got shape {shape}")
      return key
    if jnp.issubdtype(dtype, jnp.integer) and shape == ():
      return jax.random.key(key)
    if dtype == jnp.uint32 and len(shape) == 1:
      return jax.random.wrap_key_data(key)
  raise TypeError(
      f"{owner}: key must be an int seed, a jax.random.key or a "
      f"jax.random.PRNGKey, got {type(key).__name__}")


def _check_distribution(distribution: str) -> None:
  if distribution not in _DISTRIBUTIONS:
    raise ValueError(
        f"distribution must be one of {list(_DISTRIBUTIONS)}, got "
        f"{distribution!r}")


def check_estimate_args(owner: str, value_fn: Any, params: Any,
                        n_samples: Any, distribution: str):
  """Checks the arguments of an estimate; returns the loss closure."""
  if params is None:
    raise ValueError(f"{owner} needs params, got None")
  value_fn = _checks.check_value_fn(value_fn, None, owner)
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  _check_distribution(distribution)
  return value_fn


def _scalar_loss(value_fn: Callable[[Any], Any], params: Any) -> jax.Array:
  out = _compose.call_value_fn(value_fn, params)
  if isinstance(out, (tuple, list, dict)):
    raise TypeError(
        "value_fn must return a scalar loss, got a "
        f"{type(out).__name__}; for a loss with auxiliary outputs pass "
        "`lambda p: loss(p)[0]`.")
  shape = jnp.shape(out)
  if shape != ():
    raise ValueError(f"value_fn must return a scalar loss, got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
    raise TypeError(
        "value_fn must return a floating-point loss, got dtype "
        f"{jnp.result_type(out)}")
  return out


def _times(z: list, hz: list) -> list:
  """z * (H z) per leaf, in at least float32."""
  wide = _tree.at_least_float32
  return [a.astype(wide(a.dtype)) * b.astype(wide(b.dtype))
          for a, b in zip(z, hz)]


class HutchinsonResult(NamedTuple):
  """What one Hutchinson pass returns.

  Attributes:
    value: the loss at `params`.
    grad: its gradient, a pytree like `params`.
    diagonal: the signed estimate mean_s z_s * (H z_s) of the Hessian diagonal,
      in at least float32.
  """

  value: jax.Array
  grad: Any
  diagonal: Any


def hutchinson_diagonal(
    value_fn: Callable[[Any], jax.Array],
    params: Any,
    key: Any,
    *,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
) -> HutchinsonResult:
  r"""Estimates the Hessian diagonal with Hutchinson probes.

  For probes :math:`z_1, \dots, z_S` with independent entries of zero mean and
  unit variance (Rademacher :math:`\pm 1` by default),

  .. math::
    \widehat{\mathrm{diag}}(H) = \frac{1}{S} \sum_{s=1}^{S} z_s \odot (H z_s),
    \qquad \mathbb{E}\,\widehat{\mathrm{diag}}(H) = \mathrm{diag}(H).

  Each product :math:`H z_s` is a forward-over-reverse pass
  ``jax.jvp(jax.grad(value_fn), (params,), (z_s,))``, which also yields the
  gradient; with ``n_samples > 1`` the primal (forward and backward) pass runs
  once (:func:`jax.linearize`) and each probe adds one tangent pass. Every
  leaf gets its own probe. Tangents are taken for the floating-point leaves of
  ``params`` only; integer and boolean leaves pass through (their gradient and
  diagonal are zeros) and ``None`` leaves are empty subtrees.

  Args:
    value_fn: the loss, a function of ``params`` returning a float scalar.
    params: the pytree at which to estimate the diagonal.
    key: an int seed or a JAX PRNG key for the probes.
    n_samples: number of probes averaged (signed) into the estimate.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    axis_name: if given (inside ``pmap`` or ``shard_map``), the value, the
      gradient and the estimate are averaged over this named axis, whether
      ``value_fn`` is the per-device loss or already its ``pmean``; replicas
      should share the key so that they use the same probes.

  Returns:
    A :class:`HutchinsonResult` ``(value, grad, diagonal)``; ``diagonal`` is
    signed (take its absolute value for AdaHessian).

  Examples:
    >>> import jax.numpy as jnp
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p ** 2)
    >>> result = aho.hutchinson_diagonal(loss, jnp.ones(3), key=0)
    >>> print(result.diagonal)
    [2. 4. 6.]

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines
    <https://doi.org/10.1080/03610918908812806>`_, 1989.

    Bekas, Kokiopoulou and Saad, `An estimator for the diagonal of a matrix
    <https://doi.org/10.1016/j.apnum.2007.01.003>`_, 2007.
  """
  value_fn = check_estimate_args("hutchinson_diagonal", value_fn, params,
                                 n_samples, distribution)
  key = as_key(key, "hutchinson_diagonal")
  return estimate(value_fn, params, jax.random.key_data(key),
                  n_samples=n_samples,
                  distribution=distribution, axis_name=axis_name,
                  probes_first=True)


def estimate(value_fn, params, key_data, *, n_samples, distribution, axis_name,
             probes_first):
  """`hutchinson_diagonal` from raw key data, without the argument checks.

  With `probes_first`, the Hessian pass starts only once the probes are
  drawn (an optimization barrier); that ordering was faster on XLA:CPU with
  two threads, but it also keeps XLA from merging the pass's gradient with a
  separately computed one, so the paths that run inside `update` beside the
  user's own gradient (AdaHessian's plain call, Sophia's estimator) do
  without it.
  """
  split = _tree.FloatLeaves.of(params)
  leaves = split.select(params)

  def loss_of_leaves(float_leaves):
    value = _scalar_loss(value_fn, split.replace(params, float_leaves))
    if axis_name is None:
      return value
    # Differentiate the axis mean: under shard_map's default check_vma=True,
    # autodiff already psums the gradient of a per-shard loss w.r.t.
    # replicated params (giving n times the mean); pmean makes that the mean,
    # and under pmap the pmean below does it instead.
    return jax.lax.pmean(value, axis_name)

  value_and_grad = jax.value_and_grad(loss_of_leaves)
  zs = probes(key_data, leaves, distribution, n_samples)
  if probes_first:
    zs, leaves = jax.lax.optimization_barrier((zs, leaves))
  if n_samples == 1:
    (value, grad), (_, hz) = jax.jvp(value_and_grad, (leaves,), (zs[0],))
    diagonal = _times(zs[0], hz)
  else:
    # One primal pass, then one tangent pass per probe. On XLA:CPU this beat
    # vmapping the probes (batched tangents got slow layouts: 1.3x the time
    # at n_samples=8) and a reduce over the probe axis (20x slower than adds).
    (value, grad), hvp = jax.linearize(value_and_grad, leaves)
    diagonal = None
    for z in zs:
      zhz = _times(z, hvp(z)[1])
      diagonal = zhz if diagonal is None else [
          a + b for a, b in zip(diagonal, zhz)]
    diagonal = [d / n_samples for d in diagonal]
  if axis_name is not None:
    value, grad, diagonal = jax.lax.pmean((value, grad, diagonal), axis_name)

  zeros = jax.tree.map(jnp.zeros_like, params)
  return HutchinsonResult(
      value=value,
      grad=split.replace(zeros, grad),
      diagonal=split.replace(zeros, diagonal),
  )


class HutchinsonState(NamedTuple):
  """State of :func:`hutchinson_estimator`: the raw data of the probe key."""

  key: jax.Array


def hutchinson_estimator(
    key: Any = None,
    *,
    n_samples: int = 1,
    distribution: str = "rademacher",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Hutchinson's Hessian-diagonal estimator as a gradient transformation.

  Its ``update(updates, state, params, *, value_fn)`` ignores ``updates`` and
  returns the signed estimate
  :math:`\frac{1}{S}\sum_s z_s \odot (H z_s)` (see
  :func:`hutchinson_diagonal`) cast to the params' dtypes, splitting its key
  on every call. It follows the protocol of the ``hessian_diagonal_fn``
  argument of :func:`optax.contrib.sophia`, which passes the loss closure as
  ``obj_fn``; ``value_fn`` is accepted as the same thing.

  Args:
    key: an int seed or a JAX PRNG key (required).
    n_samples: number of probes per estimate.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    axis_name: named axis over which estimates are averaged.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adahessian_optax as aho
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> tx = optax.contrib.sophia(
    ...     1e-1, hessian_diagonal_fn=aho.hutchinson_estimator(key=0))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(
    ...     jax.grad(loss)(params), state, params, obj_fn=loss)
    >>> print(optax.apply_updates(params, updates))
    [0.1 0.1 0.1]

  References:
    Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023.
  """
  _checks.check_positive_int("n_samples", n_samples, allow_traced=False)
  _check_distribution(distribution)
  typed = as_key(key, "hutchinson_estimator")

  def init_fn(params):
    del params
    return HutchinsonState(key=jax.random.key_data(typed))

  def update_fn(updates, state, params=None, *, value_fn=None, obj_fn=None,
                **extra_args):
    del updates, extra_args
    if params is None:
      raise ValueError("hutchinson_estimator.update needs params, got None")
    fn = _checks.check_value_fn(value_fn, obj_fn, "hutchinson_estimator.update")
    next_key, probe_key = split_key_data(state.key)
    diagonal = estimate(
        fn, params, probe_key, n_samples=n_samples,
        distribution=distribution, axis_name=axis_name,
        probes_first=False).diagonal
    return (optax.tree.cast_like(diagonal, params),
            HutchinsonState(key=next_key))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
