"""The one timer of the benchmarks: variants timed in interleaved rounds.

Each variant is timed in short blocks; in every round all variants run once,
in a rotating order (reversed every other round); a ratio is taken within
each round and the median over rounds is reported, so that load on a shared
machine moves numerator and denominator together. With one thread the
process is pinned to one core and timed by its CPU time, which other load
barely moves.

Used by the speed suite (``benchmarks/speed``), the analysis benchmark
(``benchmarks/analysis``) and, for the seconds of each run, the study.
"""

import dataclasses
import os
import platform
import time
from typing import Any, Callable, Optional

import jax
import numpy as np


def configure(threads: int, with_torch: bool = False) -> Callable[[], float]:
  """Pins the process for `threads` (before JAX's first computation).

  ``threads``: 1 pins the process to one core; 2 or 0 (a GPU) leave it.
  Returns the clock: process CPU time for one thread, wall time otherwise.
  """
  if threads == 1:
    # JAX sizes its CPU thread pool from the affinity mask: one core, one
    # compute thread.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  if with_torch:
    # With OpenMP's default spin-waiting, torch's threads stall for tens of
    # ms at every barrier when the other core is busy (a shared machine):
    # measured 330 ms vs 28 ms per MLP Adam step. Passive waiting is fair.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  return time.process_time if threads == 1 else time.perf_counter


def header() -> str:
  """Versions, machine and XLA flags, for the top of a report."""
  import optax  # pylint: disable=import-outside-toplevel
  import adahessian_optax as aho  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return (f"jax {jax.__version__}, optax {optax.__version__}, "
          f"adahessian_optax {aho.__version__}; {device.platform} "
          f"({getattr(device, 'device_kind', '?')}); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"CPUs, affinity {sorted(os.sched_getaffinity(0))}; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}")


@dataclasses.dataclass
class Variant:
  """One thing to time: `unit()` runs `steps` steps and waits for them."""

  name: str
  unit: Callable[[], Any]
  steps: int = 1
  block_s: Optional[float] = None  # this variant's block, if not the run's
  calls: int = 1  # units per timed block, set by calibration
  times: dict = dataclasses.field(default_factory=dict)  # round -> s/step


def jax_unit(fn: Callable[[], Any]) -> Callable[[], None]:
  def unit():
    jax.block_until_ready(fn())
  return unit


def stepping(step, params, opt_state, batch, pattern) -> Callable[[], None]:
  """A unit that runs `step` once per entry of `pattern` (its `refresh`)."""
  carry = [params, opt_state]

  def unit():
    p, s = carry
    for refresh in pattern:
      p, s = step(p, s, batch, refresh=refresh)
    jax.block_until_ready((p, s))
    carry[0], carry[1] = p, s
  return unit


def calibrate(variants: list, block_s: float, clock) -> None:
  """Compiles and warms every variant; sizes its timed block (`block_s`
  seconds, or the variant's own).

  With a block of 0 a variant is warmed once and timed one unit at a time
  (units that take long, such as a whole Lanczos run).
  """
  for v in variants:
    block = block_s if v.block_s is None else v.block_s
    v.unit()
    if not block:
      v.calls = 1
      continue
    v.unit()
    t0 = clock()
    v.unit()
    dt = clock() - t0
    v.calls = max(1, int(round(block / max(dt, 1e-6))))


def run_rounds(variants: list, rounds: int, clock) -> None:
  n = len(variants)
  for r in range(rounds):
    order = variants[r % n:] + variants[:r % n]
    if r % 2:
      order = order[::-1]
    for v in order:
      t0 = clock()
      for _ in range(v.calls):
        v.unit()
      v.times[r] = (clock() - t0) / (v.calls * v.steps)
    print(f"  round {r + 1}/{rounds}", end="\r", flush=True)
  print(" " * 30, end="\r")


def measure(variants: list, rounds: int, block_s: float, clock) -> dict:
  """Calibrates the variants and times them in `rounds`; name -> variant."""
  calibrate(variants, block_s, clock)
  run_rounds(variants, rounds, clock)
  return {v.name: v for v in variants}


def _summary(r: np.ndarray) -> dict:
  return {"median": float(np.median(r)), "q25": float(np.quantile(r, 0.25)),
          "q75": float(np.quantile(r, 0.75)), "n": int(r.size)}


def ratio(by: dict, a: str, b: str) -> dict:
  """Median over rounds of time(a) / time(b), with its quartiles."""
  ta, tb = by[a].times, by[b].times
  return _summary(np.asarray([ta[i] / tb[i] for i in ta if i in tb]))


def ratio_of(by: dict, names: list, fn: Callable[..., float]) -> dict:
  """Median over rounds of fn(time of each name), within each round."""
  t = [by[n].times for n in names]
  rounds = sorted(set(t[0]).intersection(*t[1:]))
  return _summary(np.asarray([fn(*(x[i] for x in t)) for i in rounds]))


def median_s(v: Variant) -> float:
  """Median seconds per step over the rounds."""
  return float(np.median(list(v.times.values())))


def median_ms(v: Variant) -> float:
  return median_s(v) * 1e3
