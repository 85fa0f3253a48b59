"""The curvature of a GPT-2-class model, sharded: top eigenvalue and trace.

The Hessian and the GGN of ``examples/gpt.py``'s model (``--config 124M``:
GPT-2 small, 124M parameters) on one batch of bytes, its params sharded
FSDP-style over ``--devices`` devices (simulated on a CPU) and the batch
split over them: the top eigenvalue (:func:`aho.eigenpairs`, Lanczos) and
the trace (:func:`aho.trace`, Hutchinson) of one operator each
(:func:`aho.curvature_operator`, built once per curvature). For each, the
per-device memory plan of its compiled program
(``lower(...).compile().memory_analysis()``, nothing allocated), then the
run itself: its time (wall and process CPU), the products it took, and the
values. The Lanczos basis holds ``--steps + 1`` vectors of the params' size
(at least float32), sharded like them.

Writes ``docs/results/analysis_at_scale.json``; ``scale_table`` renders the
docs' line. The 124M run takes a few minutes on 2 CPU cores::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m benchmarks.analysis.at_scale --config 124M --devices 8 \\
      --batch 8 --seq 64
"""

import argparse
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import adahessian_optax as aho
from benchmarks.common import report
from examples import gpt

GIB = 2 ** 30


def _losses(graphdef):
  """`{curvature: loss}`, each defined once (so each compiles once)."""
  hessian = functools.partial(gpt.loss_fn, graphdef=graphdef)

  def logits(params, batch):
    return gpt.logits_fn(graphdef, params, batch[:, :-1])

  def cross_entropy(logits, batch):
    return aho.SoftmaxCrossEntropy(batch[:, 1:])(logits.astype(jnp.float32))

  return {"hessian": hessian, "ggn": aho.ggn(logits, cross_entropy)}


def _programs(loss, steps: int, samples: int):
  def top(params, batch, key):
    op = aho.curvature_operator(loss, params, batch=batch)
    return aho.eigenpairs(op, key, tol=1e-2, n_steps=steps)

  def trace(params, batch, key):
    op = aho.curvature_operator(loss, params, batch=batch)
    return aho.trace(op, key, n_samples=samples)
  return {"top": jax.jit(top), "trace": jax.jit(trace)}


def _plan(program, abstract_args) -> tuple[dict, Any]:
  """The per-device memory plan of `program` and the compiled program (run
  as it is, so that the timed call does not compile again)."""
  start, wall = time.process_time(), time.perf_counter()
  compiled = program.lower(*abstract_args).compile()
  stats = compiled.memory_analysis()
  return {"temp_gib": stats.temp_size_in_bytes / GIB,
          "argument_gib": stats.argument_size_in_bytes / GIB,
          "output_gib": stats.output_size_in_bytes / GIB,
          "compile_cpu_s": time.process_time() - start,
          "compile_wall_s": time.perf_counter() - wall}, compiled


def measure(args) -> dict:
  cfg = gpt.CONFIGS[args.config]
  graphdef, params = gpt.build(cfg, abstract=True)
  mesh = gpt.make_mesh(args.devices)
  param_shardings = gpt.shardings(params, mesh)
  abstract_params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params, param_shardings)
  batch = gpt.sample_batch(gpt.load_bytes(), args.batch, args.seq,
                           np.random.default_rng(0))
  abstract_batch = jax.ShapeDtypeStruct(batch.shape, batch.dtype,
                                        sharding=gpt.batch_sharding(mesh))
  key = jax.random.key(0)
  results = {"config": args.config, "params": gpt.param_count(params),
             "devices": args.devices, "batch": list(batch.shape),
             "steps": args.steps, "samples": args.samples,
             "jax": jax.__version__, "backend": jax.default_backend(),
             "curvatures": {}}
  concrete = None
  for curvature, loss in _losses(graphdef).items():
    out = {}
    for task, program in _programs(loss, args.steps, args.samples).items():
      out[task], compiled = _plan(program,
                                  (abstract_params, abstract_batch, key))
      print(f"{curvature} {task}: plan {out[task]}", flush=True)
      if args.plan_only:
        continue
      if concrete is None:
        _, real = gpt.build(cfg)
        concrete = (jax.device_put(real, param_shardings),
                    jax.device_put(batch, gpt.batch_sharding(mesh)))
      wall, cpu = time.perf_counter(), time.process_time()
      result = jax.block_until_ready(compiled(*concrete, key))
      out[task].update(wall_s=time.perf_counter() - wall,
                       cpu_s=time.process_time() - cpu)
      if task == "top":
        out[task].update(value=float(result.values[0]),
                         products=int(result.info.n_steps),
                         converged=bool(result.info.converged),
                         residual=float(result.info.residuals[0]))
      else:
        out[task].update(value=float(result.estimate),
                         stderr=float(result.stderr), products=args.samples)
      print(f"{curvature} {task}: {out[task]}", flush=True)
    results["curvatures"][curvature] = out
  return results


def scale_table(data: dict) -> str:
  """One line per curvature and task: value, products, time, memory."""
  header = ["curvature", "task", "value", "products", "run s", "compile s",
            "temp GiB per device", "arguments GiB per device"]
  rows = []
  for curvature, tasks in data["curvatures"].items():
    for task, r in tasks.items():
      if "value" not in r:
        value = "-"
      elif task == "top":
        value = f"{r['value']:.4g} (residual {r['residual']:.2g}" + (
            ", converged)" if r["converged"] else ")")
      else:
        value = f"{r['value']:.4g} ± {r['stderr']:.2g}"
      rows.append([curvature, "top eigenvalue" if task == "top" else "trace",
                   value, str(r.get("products", "-")),
                   f"{r['wall_s']:.0f}" if "wall_s" in r else "-",
                   f"{r['compile_wall_s']:.0f}",
                   f"{r['temp_gib']:.2f}", f"{r['argument_gib']:.2f}"])
  return report.table(header, rows)


def values(data: dict) -> dict:
  """Numbers the docs quote: the mesh, the batch and the settings, the
  largest per-device plan and the minutes of the whole run."""
  runs = [r for tasks in data["curvatures"].values() for r in tasks.values()]
  return {
      "devices": str(data["devices"]),
      "batch": f"{data['batch'][0]} sequences of {data['batch'][1] - 1}",
      "steps": str(data["steps"]), "samples": str(data["samples"]),
      "max temp": f"{max(r['temp_gib'] for r in runs):.2f}",
      "minutes": f"{sum(r.get('wall_s', 0) + r['compile_wall_s'] for r in runs) / 60:.0f}",
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="124M", choices=sorted(gpt.CONFIGS))
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--steps", type=int, default=12,
                      help="most Lanczos steps (the basis holds one more)")
  parser.add_argument("--samples", type=int, default=8,
                      help="Hutchinson probes for the trace")
  parser.add_argument("--plan-only", action="store_true",
                      help="the memory plans, without running")
  parser.add_argument("--out", default=os.path.join(
      "docs", "results", "analysis_at_scale.json"))
  args = parser.parse_args(argv)
  if jax.device_count() < args.devices:
    parser.error(f"--devices {args.devices} but JAX sees "
                 f"{jax.device_count()}: set XLA_FLAGS="
                 f"--xla_force_host_platform_device_count={args.devices}")
  if args.batch % args.devices:
    parser.error(f"--batch {args.batch} must be a multiple of --devices "
                 f"{args.devices}: the batch is split over them")
  results = measure(args)
  print(scale_table(results))
  if args.out:
    report.save_json(args.out, results)


if __name__ == "__main__":
  main()
