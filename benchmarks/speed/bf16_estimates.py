"""Curvature estimates with bf16 compute, against float32.

``examples/gpt.py``'s ``tiny`` decoder (2 layers, width 32, bytes; 34,688
float32 params), after 50 AdamW steps on standard-library source, on one
batch of 16 x 32 bytes. With the params in float32 and the model computing
in float32 or in bf16 (``--dtype bfloat16``: activations, matmuls and logits
in bf16, the loss in float32), the same probes (Hutchinson) and the same
label keys (GNB: the labels are drawn from each run's own logits, so a few
differ) give ``S`` estimates of the diagonal each. Reported, over all
params as one vector: the relative error of the bf16 mean of ``S``
estimates against the float32 mean of the same ``S`` (what bf16 changes),
and, for scale, the relative error of a float32 mean of ``S`` against
another of ``S`` independent draws, divided by sqrt(2) (the Monte Carlo
error of one mean). The gradient's relative error is the first row.

About 2 minutes on 2 cores (5 beside another job).

Usage (from the repository root)::

  python -m benchmarks.speed.bf16_estimates \\
      [--json docs/results/bf16_estimates.json]
"""

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_optax as aho
from benchmarks.common import report as _report
from examples import gpt

SAMPLES = (1, 16, 256, 2048)
BATCH, SEQ = 16, 32


def _setup(seed=0):
  """The tiny model after 50 AdamW steps, and a held-out batch."""
  cfg = gpt.CONFIGS["tiny"]
  graphdef, params = gpt.build(cfg, seed=seed)
  ids = gpt.load_bytes()
  rng = np.random.default_rng(seed)
  tx = optax.adamw(3e-3)
  opt_state = tx.init(params)
  step = jax.jit(functools.partial(gpt.train_step, cfg, graphdef, tx,
                                   gpt.Settings(optimizer="AdamW")))
  for _ in range(50):
    batch = jnp.asarray(gpt.sample_batch(ids, BATCH, SEQ, rng))
    params, opt_state, _ = step(params, opt_state, batch)
  batch = jnp.asarray(gpt.sample_batch(ids, BATCH, SEQ,
                                       np.random.default_rng(seed + 1)))
  return cfg, params, batch


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                          for x in jax.tree.leaves(tree)])


def _draws(kind, cfg, params, batch, keys):
  """`len(keys)` estimates of the diagonal, each a flat float32 vector."""
  graphdef = gpt.build(cfg, abstract=True)[0]
  if kind == "hutchinson":
    value_fn = lambda p: gpt.loss_fn(p, batch, graphdef=graphdef)
    one = lambda k: _flat(aho.hutchinson_diagonal(value_fn, params,
                                                  k).diagonal)
  else:
    value_fn = gpt.ggn_loss(graphdef, batch)
    one = lambda k: _flat(aho.gnb_diagonal(value_fn, params, k).diagonal)
  return jax.jit(lambda ks: jax.lax.map(one, ks, batch_size=64))(keys)


def _rel(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def measure() -> dict:
  cfg, params, batch = _setup()
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  graphdef = gpt.build(cfg, abstract=True)[0]
  graphdef16 = gpt.build(bf16, abstract=True)[0]
  grad = lambda g: _flat(jax.grad(functools.partial(
      gpt.loss_fn, graphdef=g))(params, batch))
  loss = lambda g: float(gpt.loss_fn(params, batch, graphdef=g))
  out = {"parameters": gpt.param_count(params), "batch": [BATCH, SEQ],
         "samples": list(SAMPLES),
         "loss": {"float32": loss(graphdef), "bfloat16": loss(graphdef16)},
         "gradient": _rel(grad(graphdef16), grad(graphdef))}
  n = max(SAMPLES)
  keys = jax.random.split(jax.random.key(0), 2 * n)
  for kind in ("hutchinson", "gnb"):
    f32 = _draws(kind, cfg, params, batch, keys)
    b16 = _draws(kind, bf16, params, batch, keys[:n])
    mean = lambda x, s: jnp.mean(x[:s], axis=0)
    out[kind] = {
        "bf16_vs_f32": [_rel(mean(b16, s), mean(f32, s)) for s in SAMPLES],
        "monte_carlo": [_rel(mean(f32, s), mean(f32[n:], s)) / np.sqrt(2)
                        for s in SAMPLES],
        "single_median": float(jnp.median(
            jnp.linalg.norm(b16 - f32[:n], axis=1)
            / jnp.linalg.norm(f32[:n], axis=1))),
    }
  return out


def bf16_table(data) -> str:
  """Relative errors (over all params) of the mean of S estimates: bf16
  against float32 with the same draws, and float32's own Monte Carlo
  error."""
  rows = []
  for kind, name in (("hutchinson", "Hutchinson"), ("gnb", "GNB")):
    d = data[kind]
    rows.append([f"{name}: bf16 against float32, same draws"]
                + [f"{x:.1e}" for x in d["bf16_vs_f32"]])
    rows.append([f"{name}: float32 against float32, independent draws "
                 "(Monte Carlo)"] + [f"{x:.1e}" for x in d["monte_carlo"]])
  return _report.table(["mean of S estimates"]
                       + [f"S = {x}" for x in data["samples"]], rows)


def values(data) -> dict:
  out = {"gradient": f"{data['gradient']:.1e}",
         "loss_f32": f"{data['loss']['float32']:.4f}",
         "loss_bf16": f"{data['loss']['bfloat16']:.4f}"}
  for kind in ("hutchinson", "gnb"):
    for s, x, y in zip(data["samples"], data[kind]["bf16_vs_f32"],
                       data[kind]["monte_carlo"]):
      out[f"{kind}:{s}"] = f"{x:.1e}"
      out[f"{kind}:mc:{s}"] = f"{y:.1e}"
    out[f"{kind}:single"] = f"{data[kind]['single_median']:.1e}"
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  data = measure()
  data["seconds"] = round(time.perf_counter() - start, 1)
  print(bf16_table(data))
  print(f"loss float32 {data['loss']['float32']:.5f}, bf16 "
        f"{data['loss']['bfloat16']:.5f}; {data['seconds']:.0f} s")
  _report.save_json(args.json, data)
  return data


if __name__ == "__main__":
  main()
