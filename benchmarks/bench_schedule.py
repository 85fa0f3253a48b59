"""How XLA:CPU's two-thread run time of a Hessian pass moves with tiny edits.

The step benchmark (``bench_adahessian.py``) found the small CNN's AdaHessian step 1.1-1.2x its
Hessian-vector product (HVP) in wall time on two threads, but 1.0x in CPU time
on one core. This script takes the HVP program (probe given as an input) and
changes only what it returns, by amounts of work that are negligible next to
the convolutions:

* ``hvp``: the gradient and H z (the floor's numerator);
* ``hvp, z*Hz``: z * (H z) instead of H z (what Hutchinson needs);
* ``hvp, 2*grad``: the gradient doubled;
* ``hvp, 2*Hz``: H z doubled;

and reports each against ``hvp``, together with the gradient, the Adam step
and the fused AdaHessian step. Every program is compiled twice: with XLA:CPU's
default scheduler and with ``xla_cpu_scheduler_type`` set to
``CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``; both are timed in the same rounds.
Ratios are medians of within-round ratios (``_timing.py``).

Usage::

  python benchmarks/bench_schedule.py               # two threads, wall time
  python benchmarks/bench_schedule.py --threads 1   # one core, CPU time
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import _models  # noqa: E402
import _steps  # noqa: E402
import _timing  # noqa: E402

EDITS = {
    "hvp": lambda z, g, hz: (g, hz),
    "hvp, z*Hz": lambda z, g, hz: (g, jax.tree.map(jnp.multiply, z, hz)),
    "hvp, 2*grad": lambda z, g, hz: (jax.tree.map(lambda a: 2 * a, g), hz),
    "hvp, 2*Hz": lambda z, g, hz: (g, jax.tree.map(lambda a: 2 * a, hz)),
}


SCHEDULERS = {
    "default": None,
    "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}


def variants_for(problem, scheduler):
  options = SCHEDULERS[scheduler]
  at = f" [{scheduler}]"
  params, batch, loss = problem.params, problem.batch, problem.loss
  tangent = optax.tree.random_like(jax.random.key(1), params,
                                   jax.random.normal)

  def hvp_with(edit):
    def run(p, z, b):
      g, hz = jax.jvp(jax.grad(lambda q: loss(q, b)), (p,), (z,))
      return edit(z, g, hz)
    fn = jax.jit(run, compiler_options=options)
    return _timing.jax_unit(lambda: fn(params, tangent, batch))

  grad_fn = jax.jit(jax.grad(loss), compiler_options=options)
  adam, tx = _steps.adam(), _steps.adahessian()
  out = [_timing.Variant("grad" + at,
                         _timing.jax_unit(lambda: grad_fn(params, batch)))]
  out += [_timing.Variant(name + at, hvp_with(edit))
          for name, edit in EDITS.items()]
  out += [
      _timing.Variant("adam step" + at, _timing.stepping(
          _steps.train_step(problem, adam, "adam", compiler_options=options),
          params, adam.init(params), batch, [None])),
      _timing.Variant("adahessian step (fused)" + at, _timing.stepping(
          _steps.train_step(problem, tx, "fused", compiler_options=options),
          params, tx.init(params), batch, [True])),
  ]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", type=int, choices=(1, 2), default=2)
  parser.add_argument("--models", default="cnn")
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--block", type=float, default=0.3,
                      help="seconds per timed block")
  args = parser.parse_args(argv)
  clock = _timing.configure(args.threads)
  print(f"jax {jax.__version__}; {args.threads} thread(s), "
        f"{'process CPU' if args.threads == 1 else 'wall'} time, "
        f"{args.rounds} rounds")
  for problem in _models.make_problems(args.models.split(",")):
    variants = [v for scheduler in SCHEDULERS
                for v in variants_for(problem, scheduler)]
    _timing.calibrate(variants, args.block, clock)
    _timing.run_rounds(variants, args.rounds, clock)
    by = {v.name: v for v in variants}
    print(f"\n[{problem.name}] ms per call (median); in brackets: over the "
          "default-scheduler program (quartiles)\n")
    print("| program | " + " | ".join(SCHEDULERS) + " | / hvp, "
          + " | / hvp, ".join(SCHEDULERS) + " |")
    print("|---|" + "---|" * (2 * len(SCHEDULERS)))
    for name in ["grad", *EDITS, "adam step", "adahessian step (fused)"]:
      row = [name]
      for scheduler in SCHEDULERS:
        v = by[f"{name} [{scheduler}]"]
        rel = _timing.ratio(by, v.name, f"{name} [default]")
        row.append(f"{_timing.median_ms(v):.1f} ({rel['median']:.2f})")
      for scheduler in SCHEDULERS:
        rel = _timing.ratio(by, f"{name} [{scheduler}]", f"hvp [{scheduler}]")
        row.append(f"{rel['median']:.3f} ({rel['q25']:.2f}-{rel['q75']:.2f})")
      print("| " + " | ".join(row) + " |")
    print()
    for scheduler in SCHEDULERS:
      at = f" [{scheduler}]"
      floor = _timing.ratio(by, "hvp" + at, "grad" + at)["median"]
      step = _timing.ratio(by, "adahessian step (fused)" + at,
                           "adam step" + at)["median"]
      print(f"{scheduler} scheduler: floor F = hvp/grad = {floor:.3f}; fused "
            f"step / Adam step = {step:.3f} = {step / floor:.3f} x F")


if __name__ == "__main__":
  main()
