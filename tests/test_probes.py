"""The bit-packed Rademacher sampler behind the default Hutchinson probes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adahessian_optax import _probes


def rademacher(key, shape, dtype):
  """One Rademacher probe for a single leaf, as the estimators draw it."""
  leaf = jnp.zeros(shape, dtype)
  return _probes.rademacher(jax.random.key_data(key), [leaf], 1)[0][0]


@pytest.mark.parametrize("shape", [(), (1,), (31,), (33,), (7, 5), (3, 3, 2, 4),
                                   (0,), (4, 0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_entries_are_plus_minus_one_with_shape_and_dtype(shape, dtype):
  z = rademacher(jax.random.key(0), shape, dtype)
  assert z.shape == shape
  assert z.dtype == dtype
  assert set(np.unique(np.asarray(z, np.float32)).tolist()) <= {-1.0, 1.0}


def test_entries_are_the_bits_of_the_random_words():
  # Independent re-derivation: entry i is bit (i mod 32) of word i // 32 of
  # XLA's Philox stream, whose state is the key's data padded to four words.
  key = jax.random.key(3)
  z = np.asarray(rademacher(key, (100,), jnp.float32))
  seed = np.zeros(4, np.uint32)
  seed[:2] = np.asarray(jax.random.key_data(key))
  words = np.asarray(jax.lax.rng_bit_generator(
      jnp.asarray(seed), (4,), jnp.uint32,
      algorithm=jax.lax.RandomAlgorithm.RNG_PHILOX)[1])
  bits = (words[np.arange(100) // 32] >> (np.arange(100) % 32).astype(np.uint32)) & 1
  np.testing.assert_array_equal(z, 2.0 * bits - 1.0)


def test_fair_and_uncorrelated():
  n = 1 << 18
  z = np.asarray(rademacher(jax.random.key(1), (n,), jnp.float32))
  bound = 5.0 / np.sqrt(n)  # five standard deviations of a mean of n signs
  assert abs(z.mean()) < bound
  # Neighbours share a word; entries 32 apart share a bit position.
  for lag in (1, 31, 32, 33):
    assert abs(np.mean(z[:-lag] * z[lag:])) < 5.0 / np.sqrt(n - lag)
  # Every bit position of the words is fair on its own.
  per_position = z.reshape(-1, 32).mean(axis=0)
  assert np.all(np.abs(per_position) < 5.0 / np.sqrt(n // 32))


def test_keys_give_different_probes_and_vmap_matches_loop():
  keys = jax.random.split(jax.random.key(2), 3)
  batched = jax.vmap(lambda k: rademacher(k, (70,), jnp.float32))(keys)
  for i, k in enumerate(keys):
    np.testing.assert_array_equal(
        batched[i], rademacher(k, (70,), jnp.float32))
  assert not np.array_equal(batched[0], batched[1])


def test_probes_of_several_leaves_and_samples_are_one_stream_in_order():
  leaves = [jnp.zeros((3, 5)), jnp.zeros((7,), jnp.bfloat16), jnp.zeros(())]
  key_data = jax.random.key_data(jax.random.key(4))
  got = _probes.rademacher(key_data, leaves, 3)
  flat = np.asarray(rademacher(jax.random.key(4), (3 * 23,),
                                           jnp.float32))
  start = 0
  for z in got:
    for leaf, piece in zip(leaves, z):
      assert piece.shape == leaf.shape and piece.dtype == leaf.dtype
      np.testing.assert_array_equal(
          np.asarray(piece, np.float32).reshape(-1),
          flat[start:start + leaf.size])
      start += leaf.size
  assert start == flat.size


def test_split_key_data_gives_new_distinct_keys_of_the_same_shape():
  for key in (jax.random.key(0), jax.random.key(0, impl="rbg")):
    data = jax.random.key_data(key)
    nxt, probe = _probes.split(data)
    assert nxt.shape == probe.shape == data.shape
    assert nxt.dtype == probe.dtype == jnp.uint32
    assert len({tuple(np.asarray(x).tolist()) for x in (data, nxt, probe)}) == 3
