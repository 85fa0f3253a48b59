"""Random probes for the Hutchinson estimators, drawn from raw key data.

Keys are kept as raw ``uint32`` key data (not typed PRNG keys) so that the
optimizer state serialises with Flax's msgpack as well as with Orbax.

JAX's default generator is bypassed on purpose. ``jax.random`` (threefry)
lowers to a while loop per draw on CPU, and a training step with one such
loop per parameter leaf lost XLA:CPU's concurrent execution: a small CNN's
Hessian pass ran 1.25x slower on two threads. Here every key split and every
Rademacher draw is one ``RngBitGenerator`` op (XLA's Philox) seeded by the
key data, and each random word gives 32 signs. XLA documents that Philox
output may differ across backends and compiler versions; a given key
reproduces a run on one installation.
"""

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree


def _philox_state(key_data: jax.Array) -> jax.Array:
  """Raw key data as a Philox state: four uint32 words (zero-padded)."""
  words = key_data.reshape(-1).astype(jnp.uint32)
  if words.size < 4:
    words = jnp.concatenate([words, jnp.zeros(4 - words.size, jnp.uint32)])
  return words[:4]


def random_words(key_data: jax.Array, n: int) -> jax.Array:
  """`n` random uint32 words from one Philox draw seeded by `key_data`.

  Under ``vmap`` each key draws its own words, exactly as in a loop (XLA's
  own batching rule would use the first key for all).
  """

  @jax.custom_batching.custom_vmap
  def words(state):
    return jax.lax.rng_bit_generator(
        state, (n,), jnp.uint32,
        algorithm=jax.lax.RandomAlgorithm.RNG_PHILOX)[1]

  @words.def_vmap
  def _(axis_size, in_batched, states):  # pylint: disable=unused-argument
    return jax.lax.map(words, states), True

  return words(_philox_state(key_data))


def split(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(next, probe)`: two new raw keys shaped like `key_data`, one draw."""
  size = math.prod(key_data.shape)
  words = random_words(key_data, 2 * size)
  return (words[:size].reshape(key_data.shape),
          words[size:].reshape(key_data.shape))


def _bits(key_data: jax.Array, size: int) -> jax.Array:
  """`size` independent 0/1 bits, 32 from each random word, as uint32.

  Every bit of the generator's output is a fair coin, so ``2 * bits - 1`` is
  exactly Rademacher, from 32x fewer words than one per entry; on CPU the
  generator is the cost (for a 1M-parameter MLP, one word per entry took
  more than half a gradient evaluation).
  """
  words = random_words(key_data, -(-size // 32))
  return ((words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
          ).reshape(-1)[:size]


def rademacher(key_data: jax.Array, leaves: list, n_samples: int) -> list:
  """`n_samples` probes of +-1 entries, each a list like `leaves`.

  All come from one draw: probe after probe, leaf after leaf, in order.
  """
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


def threefry_key(key_data: jax.Array) -> jax.Array:
  """A typed threefry key made from raw key data, for ``jax.random``."""
  return jax.random.wrap_key_data(_philox_state(key_data)[:2],
                                  impl="threefry2x32")


def gaussian(key_data: jax.Array, leaves: list, n_samples: int) -> list:
  """`n_samples` probes of standard normal entries, each a list like `leaves`.

  Drawn with ``jax.random.normal`` (threefry), one key per probe and leaf.
  """
  typed = threefry_key(key_data)
  return [optax.tree.random_like(k, leaves, jax.random.normal)
          for k in jax.random.split(typed, n_samples)]


SAMPLERS: dict[str, Callable[[jax.Array, list, int], list]] = {
    "gaussian": gaussian,
    "rademacher": rademacher,
}


def check_distribution(distribution: Any) -> None:
  if distribution not in SAMPLERS:
    raise ValueError(
        f"distribution must be one of {sorted(SAMPLERS)}, got "
        f"{distribution!r}")


def key_data(key: Any, owner: str) -> jax.Array:
  """Raw uint32 key data from an int seed, a typed key or raw key data."""
  if key is None:
    raise ValueError(
        f"{owner} needs `key`, an int seed or a jax.random.key, to draw its "
        "Hutchinson probes (no seed is chosen for you), e.g. key=0.")
  if isinstance(key, bool):
    raise TypeError(
        f"{owner}: key must be an int seed or a JAX key, got {key!r}")
  if isinstance(key, numbers.Integral):
    return jax.random.key_data(jax.random.key(key))
  dtype = getattr(key, "dtype", None)
  shape = getattr(key, "shape", None)
  if dtype is not None:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if shape != ():
        raise ValueError(
            f"{owner}: key must be a single key, got shape {shape}")
      return jax.random.key_data(key)
    if jnp.issubdtype(dtype, jnp.integer) and shape == ():
      return jax.random.key_data(jax.random.key(key))
    if dtype == jnp.uint32 and len(shape) == 1:
      return jnp.asarray(key)
  raise TypeError(
      f"{owner}: key must be an int seed, a jax.random.key or a "
      f"jax.random.PRNGKey, got {type(key).__name__}")
