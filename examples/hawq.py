r"""Mixed-precision quantization of the digits CNN from Hessian traces (HAWQ-V2).

The network, data and training step are those of ``examples/digits.py``
(imported from there). For each seed the script trains the CNN with Adam,
then estimates, on the training loss (eval mode: BatchNorm's running
statistics, no dropout), the average Hessian trace
:math:`\mathrm{Tr}(H_i)/n_i` of each layer's weight matrix or kernel with
``aho.layer_summary`` (Hutchinson, with standard errors). HAWQ-V2's
sensitivity of layer :math:`i` at :math:`b` bits is

.. math::
  \Omega_i(b) = \frac{\mathrm{Tr}(H_i)}{n_i}
  \,\|Q_b(W_i) - W_i\|^2,

about twice the second-order increase of the loss, :math:`\tfrac12
\Delta^\top H \Delta`, for an error :math:`\Delta` that is not aligned
with the curvature. Over the choices {2, 3, 4, 6, 8} bits per layer, an
exhaustive search picks the allocation of least :math:`\sum_i \Omega_i`
whose weights take at most 3 (then 4) bits on average. The script then
quantizes (symmetric uniform, per tensor or ``--per-channel``; biases and
BatchNorm stay in float32) and compares test accuracy and loss with the
allocations from the top eigenvalue in place of the average trace, from the
reversed ranking, from no Hessian at all (least :math:`\sum_i \|Q(W_i) -
W_i\|^2`), with uniform bits, and with every allocation within the budget
(its rank among them by test loss).

    python examples/hawq.py            # 3 seeds, about 1 minute on 2 cores
    python examples/hawq.py --smoke    # seconds, for tests

It prints the tables and writes ``hawq.json`` and ``hawq.md`` to ``--out``
(default ``results/``).
"""

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402  pylint: disable=wrong-import-position

import adahessian_optax as aho  # noqa: E402  pylint: disable=wrong-import-position

LAYERS = ("conv1", "conv2", "dense1", "dense2")
BITS = (2, 3, 4, 6, 8)
# Average bits per quantized weight. dense1 holds 86% of the weights, so at 4
# bits every method picks uniform 4 bits from {2, 4, 8}; 3 bits and the
# finer choices leave room for a ranking to matter.
BUDGETS = (3.0, 4.0)


def quantize(w: jax.Array, bits: int, per_channel: bool = False) -> jax.Array:
  """Symmetric uniform quantization to `bits` bits: `s * round(w / s)` with
  integers in [-(2^(b-1) - 1), 2^(b-1) - 1] and `s` the largest `|w|` over
  that (of the tensor, or of each output channel: the last axis)."""
  levels = 2 ** (bits - 1) - 1
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  scale = jnp.max(jnp.abs(w), axis=axes, keepdims=per_channel) / levels
  scale = jnp.where(scale > 0, scale, 1.0)
  return scale * jnp.clip(jnp.round(w / scale), -levels, levels)


@functools.lru_cache(maxsize=None)
def _eval_fns(graphdef):
  """`(loss, evaluate)` of `(params, (rest, x, y))` in eval mode, one pair
  per graph: the Hessian's loss, and a jitted (loss, accuracy)."""
  def logits_of(params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()  # running statistics, no dropout
    return model(x)

  def loss(params, batch):
    rest, x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_of(params, rest, x), y).mean()

  @jax.jit
  def evaluate(params, batch):
    rest, x, y = batch
    logits = logits_of(params, rest, x)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            jnp.mean(jnp.argmax(logits, -1) == y))

  return loss, evaluate


def _is_kernel(path) -> bool:
  return path[0].key in LAYERS and path[1].key == "kernel"


def kernels(params) -> dict:
  """`{layer: kernel array}`."""
  return {path[0].key: x for path, x in
          jax.tree_util.tree_flatten_with_path(params)[0] if _is_kernel(path)}


def with_kernels(params, new: dict):
  """`params` with the kernels of `new` replaced."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: new[path[0].key] if _is_kernel(path) else x, params)


def train(seed: int, data, args):
  """Adam at digits.py's tuned rate; `(graphdef, params, rest)`."""
  spec = next(s for s in digits.SPECS if s.name == "Adam")
  x_train, y_train = data[0], data[1]
  steps_per_epoch = len(x_train) // args.batch_size
  total = args.epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, spec.learning_rate, warmup_steps=min(steps_per_epoch,
                                                total // 4 + 1),
      decay_steps=total)
  model = digits.CNN(nnx.Rngs(seed))
  graphdef, state = nnx.split(
      (model, nnx.Optimizer(model, spec.make(schedule, seed), wrt=nnx.Param)))
  train_step = _train_step(spec, graphdef)
  order_rng = np.random.default_rng(seed)
  for _ in tqdm(range(args.epochs), desc=f"seed {seed}", leave=False,
                disable=args.no_progress):
    order = order_rng.permutation(len(x_train))
    for idx in np.split(order[:steps_per_epoch * args.batch_size],
                        steps_per_epoch):
      state, _ = train_step(state, jnp.asarray(x_train[idx]),
                            jnp.asarray(y_train[idx]))
  model, _ = nnx.merge(graphdef, state)
  return nnx.split(model, nnx.Param, ...)


_STEPS = {}


def _train_step(spec, graphdef):
  if graphdef not in _STEPS:
    _STEPS[graphdef] = digits.make_train_step(spec, graphdef)
  return _STEPS[graphdef]


def sensitivities(graphdef, params, rest, data, args):
  """Per layer: size, average trace and its stderr, top eigenvalue."""
  loss, _ = _eval_fns(graphdef)
  n = args.hessian_size
  x, y = jnp.asarray(data[0][:n]), jnp.asarray(data[1][:n])
  dataset = aho.DatasetLoss(loss, [(rest, x, y)],
                            size_fn=lambda batch: len(batch[2]))
  wrt = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: _is_kernel(path), p)
  start = time.perf_counter()
  summary = aho.layer_summary(dataset, params, key=args.seed,
                              n_samples=args.n_samples, n_steps=args.n_steps,
                              wrt=wrt)
  summary = jax.block_until_ready(summary)
  seconds = time.perf_counter() - start  # compilation included
  pick = lambda tree: {k: float(v) for k, v in kernels(tree).items()}
  return {"hessian_s": seconds,
          "size": {k: int(v) for k, v in kernels(summary.size).items()},
          "mean_trace": pick(summary.mean_trace),
          "mean_trace_stderr": pick(summary.mean_trace_stderr),
          "top_eigenvalue": pick(summary.top_eigenvalue)}


def average_bits(bits: tuple, sizes: dict) -> float:
  return (sum(b * sizes[k] for b, k in zip(bits, LAYERS))
          / sum(sizes[k] for k in LAYERS))


def feasible(sizes: dict, budget: float) -> list:
  """Every allocation of `BITS` to the layers within `budget` bits per
  weight on average."""
  return [bits for bits in itertools.product(BITS, repeat=len(LAYERS))
          if average_bits(bits, sizes) <= budget]


def best_allocation(weights: dict, errors: dict, sizes: dict,
                    budget: float) -> tuple:
  """The bits per layer of least `sum_i weights[i] * errors[i][b_i]`
  within the budget (exhaustive: 5^4 allocations at most)."""
  return min(feasible(sizes, budget), key=lambda bits: sum(
      weights[k] * errors[k][b] for k, b in zip(LAYERS, bits)))


def study_seed(seed: int, data, args) -> dict:
  """Trains, measures the traces, allocates, quantizes and evaluates."""
  graphdef, params, rest = train(seed, data, args)
  sens = sensitivities(graphdef, params, rest, data, args)
  _, evaluate = _eval_fns(graphdef)
  test = (rest, jnp.asarray(data[2]), jnp.asarray(data[3]))
  train_batch = (rest, jnp.asarray(data[0]), jnp.asarray(data[1]))
  ws = kernels(params)
  quantized = {(k, b): quantize(ws[k], b, args.per_channel)
               for k in LAYERS for b in BITS}
  errors = {k: {b: float(jnp.sum((quantized[k, b] - ws[k]) ** 2))
                for b in BITS} for k in LAYERS}
  sizes, trace = sens["size"], sens["mean_trace"]

  def result(bits) -> dict:
    q = with_kernels(params, {k: quantized[k, b]
                              for k, b in zip(LAYERS, bits)})
    test_loss, test_acc = evaluate(q, test)
    train_loss, _ = evaluate(q, train_batch)
    return {"bits": list(bits), "avg_bits": average_bits(bits, sizes),
            "omega": sum(trace[k] * errors[k][b] for k, b in zip(LAYERS,
                                                                  bits)),
            "test_loss": float(test_loss), "test_acc": float(test_acc),
            "train_loss": float(train_loss)}

  ranked = sorted(LAYERS, key=lambda k: trace[k])  # ascending average trace
  reversed_trace = dict(zip(ranked, [trace[k] for k in reversed(ranked)]))
  ones = {k: 1.0 for k in LAYERS}
  budgets = {}
  for budget in args.budgets:
    allocations = {
        "HAWQ-V2 (average trace)": best_allocation(trace, errors, sizes,
                                                   budget),
        "top eigenvalue instead": best_allocation(sens["top_eigenvalue"],
                                                  errors, sizes, budget),
        "reversed ranking": best_allocation(reversed_trace, errors, sizes,
                                            budget),
        "no Hessian (least ‖Q(W)−W‖²)": best_allocation(ones, errors, sizes,
                                                       budget),
        f"uniform {budget:g} bits": (int(budget),) * len(LAYERS),
    }
    every = [result(bits) for bits in feasible(sizes, budget)]
    by_test_loss = sorted(r["test_loss"] for r in every)
    rows = {}
    for name, bits in allocations.items():
      r = result(bits)
      r["rank"] = 1 + by_test_loss.index(r["test_loss"])
      rows[name] = r
    budgets[str(budget)] = {"allocations": rows, "feasible": every}
  fp_test_loss, fp_test_acc = evaluate(params, test)
  fp_train_loss, _ = evaluate(params, train_batch)
  return {"seed": seed, **sens, "errors": errors,
          "float32": {"test_loss": float(fp_test_loss),
                      "test_acc": float(fp_test_acc),
                      "train_loss": float(fp_train_loss)},
          "budgets": budgets}


def _mean_std(values, scale=1.0, digits_=2) -> str:
  values = [scale * v for v in values]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits_}f} ± {spread:.{digits_}f}"


def sensitivity_table(seeds) -> str:
  lines = ["| seed | layer | weights | Tr(H)/n ± stderr | λmax(H_i) "
           f"| ‖Q(W)−W‖² at {', '.join(map(str, BITS))} bits |",
           "|---|---|---|---|---|---|"]
  for s in seeds:
    for k in sorted(LAYERS, key=lambda k: -s["mean_trace"][k]):
      err = ", ".join(f"{s['errors'][k][b]:.2g}" for b in BITS)
      lines.append(
          f"| {s['seed']} | {k} | {s['size'][k]} "
          f"| {s['mean_trace'][k]:.3g} ± {s['mean_trace_stderr'][k]:.2g} "
          f"| {s['top_eigenvalue'][k]:.3g} | {err} |")
  return "\n".join(lines)


def _gmean(values) -> str:
  return f"{statistics.mean(values):.2g}"


def allocation_table(seeds, budget: str) -> str:
  """Mean ± std over seeds of each allocation's results at one budget."""
  n = len(seeds)
  count = len(seeds[0]["budgets"][budget]["feasible"])
  lines = [f"| weights | bits {', '.join(LAYERS)} (per seed) | average bits "
           f"| ½ Σ Ω | Δ train loss | test acc % ({n} seeds) | test loss "
           f"| rank by test loss (of {count}) |",
           "|---|---|---|---|---|---|---|---|"]
  fp = [s["float32"] for s in seeds]
  lines.append(
      f"| float32 | - | 32 | 0 | 0 "
      f"| {_mean_std([f['test_acc'] for f in fp], 100)} "
      f"| {_mean_std([f['test_loss'] for f in fp], digits_=3)} | - |")
  for name in seeds[0]["budgets"][budget]["allocations"]:
    rs = [s["budgets"][budget]["allocations"][name] for s in seeds]
    bits = [ "/".join(map(str, r["bits"])) for r in rs]
    bits = bits[0] if len(set(bits)) == 1 else "; ".join(bits)
    lines.append(
        f"| {name} | {bits} "
        f"| {_mean_std([r['avg_bits'] for r in rs])} "
        f"| {_gmean([r['omega'] / 2 for r in rs])} "
        f"| {_gmean([r['train_loss'] - s['float32']['train_loss'] for r, s in zip(rs, seeds)])} "
        f"| {_mean_std([r['test_acc'] for r in rs], 100)} "
        f"| {_mean_std([r['test_loss'] for r in rs], digits_=3)} "
        f"| {', '.join(str(r['rank']) for r in rs)} |")
  return "\n".join(lines)


def _spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


# The docs' tables and quoted values, each a function of a results file
# (``--json``: docs/results/hawq_per_tensor.json, written by ``python
# examples/hawq.py --json ...``, and hawq_per_channel.json, by the same with
# ``--per-channel``).

# The criteria of `study_seed`, as the docs' tables name them.
_SHORT = {"HAWQ-V2 (average trace)": "HAWQ-V2",
          "top eigenvalue instead": "top eigenvalue",
          "reversed ranking": "reversed ranking",
          "no Hessian (least ‖Q(W)−W‖²)": "no Hessian (least ‖Q(W)−W‖²)"}


def _sci(x: float, digits_: int = 2) -> str:
  """`x` to `digits_` significant digits, in e-notation below 1e-2."""
  if x != 0 and abs(x) < 1e-2:
    mantissa, exponent = f"{x:.{digits_ - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"
  if abs(x) >= 10 ** digits_:
    return f"{float(f'{x:.{digits_}g}'):,.0f}"
  return f"{x:.{digits_}g}"


def _spread(values, scale=1.0, digits_=2) -> str:
  """Mean ± standard deviation over seeds; the mean alone if they agree."""
  values = [scale * v for v in values]
  if len(values) > 1 and statistics.stdev(values) > 0:
    return (f"{statistics.mean(values):.{digits_}f} "
            f"± {statistics.stdev(values):.{digits_}f}")
  return f"{statistics.mean(values):.{digits_}f}"


def sensitivity_results(data) -> str:
  """The first seed's per-layer curvature and quantization errors, layers
  by decreasing average trace."""
  s = data["seeds"][0]
  scheme = "per channel" if data["settings"]["per_channel"] else "per tensor"
  bits = data["bits"]
  lines = ["| layer | weights | Tr(H)/n ± stderr | λmax(H_i) "
           f"| ‖Q(W)−W‖² at {', '.join(map(str, bits))} bits ({scheme}) |",
           "|---|---|---|---|---|"]
  for k in sorted(data["layers"], key=lambda k: -s["mean_trace"][k]):
    errors = ", ".join(_sci(s["errors"][k][str(b)]) for b in bits)
    lines.append(
        f"| {k} | {s['size'][k]:,} | {_sci(s['mean_trace'][k], 3)} "
        f"± {_sci(s['mean_trace_stderr'][k])} "
        f"| {_sci(s['top_eigenvalue'][k], 3)} | {errors} |")
  return "\n".join(lines)


def _criteria(seeds, budget: str) -> dict:
  """`{name in the docs: [each seed's row]}` at one budget, uniform last."""
  names = list(seeds[0]["budgets"][budget]["allocations"])
  return {_SHORT.get(name, "uniform"): [
      s["budgets"][budget]["allocations"][name] for s in seeds]
          for name in names}


def allocation_results(data) -> str:
  """Mean ± std over seeds of each criterion's allocation at each budget
  (largest first), against float32; the better test accuracy and loss of
  HAWQ-V2 and uniform bits in bold."""
  seeds = data["seeds"]
  lines = ["| budget | criterion | bits " + "/".join(data["layers"])
           + " | average bits | ½ Σ Ω | Δ train loss | test acc % "
           "| test loss | rank by test loss |",
           "|---|---|---|---|---|---|---|---|---|"]
  fp = [s["float32"] for s in seeds]
  lines.append(
      f"| - | float32 | - | 32 | 0 | 0 "
      f"| {_spread([f['test_acc'] for f in fp], 100)} "
      f"| {_spread([f['test_loss'] for f in fp], digits_=3)} | - |")
  for budget in sorted(seeds[0]["budgets"], key=float, reverse=True):
    rows = _criteria(seeds, budget)
    count = len(seeds[0]["budgets"][budget]["feasible"])
    mean = lambda rs, key: statistics.mean(r[key] for r in rs)
    best_acc = max(("HAWQ-V2", "uniform"),
                   key=lambda n: mean(rows[n], "test_acc"))
    best_loss = min(("HAWQ-V2", "uniform"),
                    key=lambda n: mean(rows[n], "test_loss"))
    for name, rs in rows.items():
      bits = ["/".join(map(str, r["bits"])) for r in rs]
      bits = bits[0] if len(set(bits)) == 1 else "; ".join(bits)
      acc = _spread([r["test_acc"] for r in rs], 100)
      loss = _spread([r["test_loss"] for r in rs], digits_=3)
      acc = f"**{acc}**" if name == best_acc else acc
      loss = f"**{loss}**" if name == best_loss else loss
      rise = statistics.mean(r["train_loss"] - s["float32"]["train_loss"]
                             for r, s in zip(rs, seeds))
      lines.append(
          f"| {float(budget):g} bits | {name} | {bits} "
          f"| {_spread([r['avg_bits'] for r in rs])} "
          f"| {_sci(statistics.mean(r['omega'] / 2 for r in rs))} "
          f"| {_sci(rise)} | {acc} | {loss} "
          f"| {', '.join(str(r['rank']) for r in rs)} of {count} |")
  return "\n".join(lines)


def values(data) -> dict:
  """The numbers the prose of docs/quantization.md quotes."""
  seeds = data["seeds"]
  out = {"seeds": str(len(seeds)),
         "test images": f"{data['test_images']:,}",
         "one test image %": f"{100 / data['test_images']:.2f}",
         "train images": f"{data['train_images']:,}",
         "hessian s": f"{statistics.median(s['hessian_s'] for s in seeds):.0f}",
         "first hessian s": f"{seeds[0]['hessian_s']:.0f}",
         "seconds": f"{data['seconds']:.0f}"}
  sizes = seeds[0]["size"]
  out["dense1 share %"] = (
      f"{100 * sizes['dense1'] / sum(sizes.values()):.0f}")
  # How far the other seeds' average traces are from the first's.
  factor = max(max(s["mean_trace"][k] / seeds[0]["mean_trace"][k],
                   seeds[0]["mean_trace"][k] / s["mean_trace"][k])
               for s in seeds[1:] for k in data["layers"]) if len(
                   seeds) > 1 else 1.0
  out["trace factor"] = f"{factor:.1f}"
  order = lambda s: sorted(data["layers"], key=lambda k: -s["mean_trace"][k])
  out["same ranking"] = ("the same" if all(order(s) == order(seeds[0])
                                           for s in seeds) else "not the same")
  ratios = [seeds[0]["errors"]["dense1"][str(b)]
            / seeds[0]["errors"]["conv1"][str(b)] for b in data["bits"]]
  out["dense1/conv1 errors"] = f"{min(ratios):.0f} to {max(ratios):.0f}"
  rho = [r for rs in data["spearman"].values() for r in rs]
  out["spearman"] = f"{min(rho):.2f} to {max(rho):.2f}"
  for budget in seeds[0]["budgets"]:
    b = f"{float(budget):g}"
    rows = _criteria(seeds, budget)
    count = len(seeds[0]["budgets"][budget]["feasible"])
    for name in ("HAWQ-V2", "uniform"):
      rs = rows[name]
      ranks = sorted(r["rank"] for r in rs)
      out[f"{b} {name} ranks"] = f"{ranks[0]} to {ranks[-1]} of {count}"
      out[f"{b} {name} acc"] = _spread([r["test_acc"] for r in rs], 100)
      out[f"{b} {name} loss"] = (
          f"{statistics.mean(r['test_loss'] for r in rs):.3f}")
      out[f"{b} {name} bits"] = (
          f"{statistics.mean(r['avg_bits'] for r in rs):.2f}")
      out[f"{b} {name} half omega"] = _sci(
          statistics.mean(r["omega"] / 2 for r in rs))
      out[f"{b} {name} rise"] = _sci(statistics.mean(
          r["train_loss"] - s["float32"]["train_loss"]
          for r, s in zip(rs, seeds)))
    wins = sum(h["test_loss"] < u["test_loss"]
               for h, u in zip(rows["HAWQ-V2"], rows["uniform"]))
    out[f"{b} HAWQ-V2 wins"] = f"{wins} of {len(seeds)}"
    others = [n for n in rows if n not in ("HAWQ-V2", "uniform")]
    out[f"{b} others uniform"] = (
        "all" if all(r["bits"] == rows["uniform"][i]["bits"]
                     for n in others for i, r in enumerate(rows[n]))
        else "not all")
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--epochs", type=int, default=None,
                      help=f"default {digits.EPOCHS} (1 with --smoke)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0,
                      help="the data split and the first seed")
  parser.add_argument("--seeds", type=int, default=None,
                      help="networks (default 3; 1 with --smoke)")
  parser.add_argument("--hessian-size", type=int, default=None,
                      help="training images in the Hessian's batch (default "
                           "512; 32 with --smoke)")
  parser.add_argument("--n-samples", type=int, default=None,
                      help="Hutchinson probes (default 100; 4 with --smoke)")
  parser.add_argument("--per-channel", action="store_true",
                      help="one scale per output channel, not per tensor")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny run for tests")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--json", default=None,
                      help="also write the results here, with the settings, "
                           "for the docs' tables (docs/quantization.md reads "
                           "docs/results/hawq_per_tensor.json and "
                           "hawq_per_channel.json)")
  args = parser.parse_args(argv)
  smoke = args.smoke
  if args.epochs is None:
    args.epochs = 1 if smoke else digits.EPOCHS
  if args.seeds is None:
    args.seeds = 1 if smoke else 3
  if args.hessian_size is None:
    args.hessian_size = 32 if smoke else 512
  if args.n_samples is None:
    args.n_samples = 4 if smoke else 100
  args.n_steps = 4 if smoke else 30
  args.budgets = BUDGETS
  if smoke:
    args.batch_size = min(args.batch_size, 32)

  start = time.perf_counter()
  data = digits.load_data(args.seed, smoke, validation=False)
  seeds = [study_seed(args.seed + s, data, args) for s in range(args.seeds)]
  rho = {budget: [_spearman(
      [r["omega"] for r in s["budgets"][budget]["feasible"]],
      [r["test_loss"] for r in s["budgets"][budget]["feasible"]])
                   for s in seeds] for budget in seeds[0]["budgets"]}

  scheme = "per channel" if args.per_channel else "per tensor"
  parts = [
      f"Per-layer curvature of the trained CNN's training loss on "
      f"{args.hessian_size} images ({args.n_samples} probes), and squared "
      f"quantization errors ({scheme}):",
      sensitivity_table(seeds)]
  for budget in seeds[0]["budgets"]:
    parts += [
        f"At most {float(budget):g} bits per weight on average (bits "
        f"{', '.join(map(str, BITS))} per layer; biases and BatchNorm in "
        f"float32; symmetric uniform {scheme}); mean over seeds of ½ Σ Ω "
        "and of the training loss's increase:",
        allocation_table(seeds, budget),
        "Spearman correlation of Σ Ω with the test loss over the "
        "allocations within the budget, per seed: "
        + ", ".join(f"{r:.2f}" for r in rho[budget])]
  report = "\n\n".join(parts)
  print()
  print(report)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "hawq.md"), "w") as f:
    f.write(report + "\n")
  with open(os.path.join(args.out, "hawq.json"), "w") as f:
    json.dump({"seeds": seeds, "spearman": rho,
               "per_channel": args.per_channel}, f)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    settings = {k: getattr(args, k) for k in (
        "epochs", "batch_size", "seed", "seeds", "hessian_size", "n_samples",
        "n_steps", "per_channel", "smoke")}
    with open(args.json, "w") as f:
      json.dump({"script": "python examples/hawq.py "
                           + " ".join(sys.argv[1:] if argv is None else argv),
                 "settings": settings, "budgets": list(args.budgets),
                 "bits": list(BITS), "layers": list(LAYERS),
                 "train_images": len(data[0]), "test_images": len(data[2]),
                 "jax": jax.__version__, "adahessian_optax": aho.__version__,
                 "platform": jax.devices()[0].platform,
                 "cpus": os.cpu_count(),
                 "seconds": time.perf_counter() - start,
                 "seeds": seeds, "spearman": rho}, f)
      f.write("\n")
    print(f"wrote {args.json}")
  print(f"\nwrote {os.path.join(args.out, 'hawq.md')} "
        f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
  main()
