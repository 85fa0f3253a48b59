"""Two kinds of loop for the same algorithm: ``lax`` and Python.

``lax`` loops when the operator's product can be traced (inside one compiled
program); Python loops when it runs programs of its own (a pass over a
dataset's batches), with the algorithm's array steps as jitted functions.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Loops(NamedTuple):
  """`while_loop`, `fori_loop` and `scan(f, carry, length)` of one kind."""

  while_loop: Callable
  fori_loop: Callable
  scan: Callable


def _traced_scan(f, carry, length):
  return jax.lax.scan(lambda c, _: f(c), carry, None, length=length)


def _host_while_loop(cond_fun, body_fun, val):
  while bool(cond_fun(val)):
    val = body_fun(val)
  return val


def _host_fori_loop(lower, upper, body_fun, val):
  for i in range(lower, upper):
    val = body_fun(i, val)
  return val


def _host_scan(f, carry, length):
  ys = []
  for _ in range(length):
    carry, y = f(carry)
    ys.append(y)
  return carry, jax.tree.map(lambda *x: jnp.stack(x), *ys)


TRACED = Loops(jax.lax.while_loop, jax.lax.fori_loop, _traced_scan)
HOST = Loops(_host_while_loop, _host_fori_loop, _host_scan)
