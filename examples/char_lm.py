"""AdaHessian against AdamW: a character-level Transformer LM in Flax Linen.

The text is the source code of a few Python standard-library modules, read
from the running interpreter (no download; it differs a little between Python
versions). A small pre-LayerNorm decoder is trained to predict the next
character; AdaHessian averages its Hessian diagonal over blocks of 32 entries
in the attention and dense kernels (the paper's block averaging for
Transformers) and refreshes the estimate every other step. The training step
is the fused one: on refresh steps ``aho.value_grad_and_hessian`` gives the
loss, the gradient and the Hessian estimate from one jvp-over-grad pass; on
the others a plain gradient; the two programs are chosen on the host
(``update_interval=None``). :class:`adahessian_optax.TrainState` passes the
estimate through ``apply_gradients``.

Two more optimizers on request use the Gauss-Newton-Bartlett estimator of
the GGN diagonal (``aho.gnb_estimator``), for which the loss is given as
``aho.ggn(model outputs, aho.SoftmaxCrossEntropy(next characters))``:
``Sophia-G`` is ``optax.contrib.sophia`` with it as ``hessian_diagonal_fn``
(the Sophia paper's Sophia-G, its estimate refreshed every
``--hessian-interval`` steps inside Sophia's own ``lax.cond``), and
``AdaHessian-GNB`` is AdaHessian with it as ``estimator`` (the fused step
then costs one forward and two backward passes).

    python examples/char_lm.py            # the comparison, a few minutes
    python examples/char_lm.py --smoke    # a few seconds, for tests
    python examples/char_lm.py --optimizers AdaHessian AdaHessian-GNB \
        Sophia-G AdamW                    # with the GNB estimator
"""

import argparse
import functools
import importlib
import inspect
import json
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import adahessian_optax as aho

DOCS_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                         "docs", "images", "char_lm_loss.png")
MODULES = ("argparse", "dataclasses", "functools", "statistics", "fractions",
           "contextlib", "heapq", "textwrap", "string", "bisect")


def load_text(max_chars=None):
  """Standard-library source as ASCII text, and its vocabulary."""
  parts = []
  for name in MODULES:
    with open(inspect.getsourcefile(importlib.import_module(name)),
              encoding="utf-8") as f:
      parts.append(f.read())
  text = "\n".join(parts)
  text = "".join(c if c == "\n" or " " <= c <= "~" else "?" for c in text)
  if max_chars is not None:
    text = text[:max_chars]
  vocab = sorted(set(text))
  ids = np.array([vocab.index(c) for c in text], dtype=np.int32)
  return ids, vocab


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(
        nn.LayerNorm()(x), mask=mask)
    h = nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(h))


class CharTransformer(nn.Module):
  vocab: int
  width: int = 64
  heads: int = 2
  layers: int = 2
  context: int = 64

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width)(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02),
                     (self.context, self.width))
    x = x + pos[:tokens.shape[1]]
    for _ in range(self.layers):
      x = Block(self.heads)(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def spatial_rules(params, block=32):
  """``block_mean`` on attention and dense kernels, nothing elsewhere.

  Written for 0.2 and kept so that the example's numbers stay comparable: it
  groups entries along each kernel's last axis (output units).
  ``aho.spatial_rules(model, tokens, block_size=32)`` gives the paper's
  grouping, blocks of input features per output unit and head.

  The attention kernels are ``(width, heads, head_dim)`` for query, key and
  value and ``(heads, head_dim, width)`` for the output; ``Dense`` kernels are
  ``(in, out)``. All are averaged over blocks of ``block`` entries of their
  last axis (the whole head for query, key and value when head_dim is 32).
  """
  def rule(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if "kernel" in names and leaf.shape[-1] >= block:
      return aho.block_mean(block)
    return None

  return jax.tree_util.tree_map_with_path(rule, params)


def loss_fn(params, apply_fn, batch):
  logits = apply_fn({"params": params}, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean()


def ggn_loss(params, apply_fn, batch):
  """The same loss as ``loss_fn``, as model outputs and a loss of them: the
  form the Gauss-Newton-Bartlett estimator draws labels from."""
  return aho.ggn(lambda p: apply_fn({"params": p}, batch[:, :-1]),
                 aho.SoftmaxCrossEntropy(batch[:, 1:]))


GNB_OPTIMIZERS = ("AdaHessian-GNB", "Sophia-G")


def make_tx(name, lr, steps, args):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, steps // 10), decay_steps=steps)
  if name in ("AdaHessian", "AdaHessian-GNB"):
    # update_interval=None: the training loop decides each refresh.
    # The GNB estimate has no off-diagonal noise to inflate it (Hutchinson's
    # |z * Hz| has) and a chi-square spread near zero: clip the update, as
    # Sophia does and as the AdaHessian docs advise for delayed refreshes.
    options = (dict(estimator=aho.gnb_estimator(key=args.seed),
                    clip_threshold=0.1)
               if name == "AdaHessian-GNB" else dict(key=args.seed))
    return aho.adahessian(schedule, weight_decay=args.weight_decay,
                          spatial_averaging=spatial_rules,
                          update_interval=None, **options)
  if name == "Sophia-G":
    return optax.contrib.sophia(
        schedule, weight_decay=args.weight_decay,
        update_interval=args.hessian_interval,
        hessian_diagonal_fn=aho.gnb_estimator(key=args.seed))
  return optax.adamw(schedule, weight_decay=args.weight_decay)


def batches(ids, batch_size, context, rng):
  starts = rng.integers(0, len(ids) - context - 1, size=batch_size)
  return np.stack([ids[s:s + context + 1] for s in starts])


def train(name, lr, data, model, val_loss, args, progress=True):
  train_ids, val_batches = data
  params = model.init(jax.random.key(args.seed),
                      jnp.zeros((1, args.context), jnp.int32))["params"]
  state = aho.TrainState.create(apply_fn=model.apply, params=params,
                                tx=make_tx(name, lr, args.steps, args))
  uses_hessian = name in ("AdaHessian", "AdaHessian-GNB")

  @functools.partial(jax.jit, static_argnames="refresh")
  def train_step(state, batch, refresh):
    value_fn = functools.partial(
        ggn_loss if name in GNB_OPTIMIZERS else loss_fn,
        apply_fn=state.apply_fn, batch=batch)
    if name in GNB_OPTIMIZERS:
      value_fn = value_fn(state.params)  # an aho.GGN: callable on params
    if name == "Sophia-G":
      # Sophia decides its refreshes itself and takes the loss on every step.
      loss, grads = jax.value_and_grad(value_fn)(state.params)
      return state.apply_gradients(grads=grads, value_fn=value_fn), loss
    if uses_hessian and refresh:
      # The fused step: loss, gradient and estimate from one pass.
      loss, grads, hessian = aho.value_grad_and_hessian(
          value_fn, state.params, state.opt_state)
      return state.apply_gradients(grads=grads, hessian=hessian), loss
    # refresh is a Python bool: the steps without a refresh compile to a
    # program without the Hessian-vector product.
    loss, grads = jax.value_and_grad(value_fn)(state.params)
    extra = {"hessian_refresh": False} if uses_hessian else {}
    return state.apply_gradients(grads=grads, **extra), loss

  rng = np.random.default_rng(args.seed)  # the same batches for both
  train_losses, val_curve = [], []
  step_time, timed_steps = 0.0, 0
  bar = tqdm(total=args.steps, desc=f"{name:>10} lr={lr:g}",
             disable=not progress, dynamic_ncols=True)
  for step in range(args.steps):
    batch = jnp.asarray(batches(train_ids, args.batch_size, args.context, rng))
    # AdamW ignores it: one program for AdamW, two for AdaHessian.
    refresh = not uses_hessian or step % args.hessian_interval == 0
    start = time.perf_counter()
    state, loss = train_step(state, batch, refresh=refresh)
    loss = float(loss)
    if step >= args.hessian_interval:  # both programs compiled by now
      step_time += time.perf_counter() - start
      timed_steps += 1
    train_losses.append(loss)
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
      val_curve.append((step + 1, float(val_loss(state.params, val_batches))))
      bar.set_postfix(loss=f"{np.mean(train_losses[-20:]):.3f}",
                      val=f"{val_curve[-1][1]:.3f}")
    bar.update(1)
  bar.close()
  return {
      "name": name, "learning_rate": lr, "train_loss": train_losses,
      "val_curve": val_curve, "final_val_loss": val_curve[-1][1],
      "ms_per_step": 1e3 * step_time / max(timed_steps, 1),
      "finite": bool(np.all(np.isfinite(train_losses))),
  }


def plot(results, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for r in results:
    steps, losses = zip(*r["val_curve"])
    ax.plot(steps, losses, marker="o", ms=3,
            label=f"{r['name']} (lr {r['learning_rate']:g}): "
                  f"{r['final_val_loss']:.3f}")
  ax.set(title="Character-level Transformer on stdlib source\n"
               "(AdaHessian: block_mean(32) on kernels, Hessian every 2 steps)",
         xlabel="step", ylabel="validation cross-entropy (nats/char)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "docs", "results", "char_lm_gnb.json")


def results_table(data) -> str:
  """The final validation loss and the step time against AdamW's, from the
  results file (docs/results/char_lm_gnb.json)."""
  rows = data["optimizers"]
  adamw = next((r["ms_per_step"] for r in rows if r["name"] == "AdamW"),
               rows[-1]["ms_per_step"])
  lines = ["| optimizer | lr | final val loss | ms/step | vs AdamW |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['learning_rate']:g} "
                 f"| {r['final_val_loss']:.4f} | {r['ms_per_step']:.1f} "
                 f"| {r['ms_per_step'] / adamw:.2f}x |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--steps", type=int, default=None,
                      help="default 600 (6 with --smoke)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--adahessian-lr", type=float, default=0.3)
  parser.add_argument("--adamw-lr", type=float, default=1e-2)
  parser.add_argument("--adahessian-gnb-lr", type=float, default=0.03)
  parser.add_argument("--sophia-lr", type=float, default=1e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-4)
  parser.add_argument("--hessian-interval", type=int, default=2)
  parser.add_argument("--eval-every", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--optimizers", nargs="+",
                      default=["AdaHessian", "AdamW"],
                      choices=["AdaHessian", "AdamW", *GNB_OPTIMIZERS])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny run for tests; does not touch docs/")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--results", default=None,
                      help="the results file docs/examples.md's table is "
                           "rendered from (default: docs/results/"
                           "char_lm_gnb.json, written by a run of all four "
                           "optimizers with the default settings)")
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 6 if args.smoke else 600
  if args.eval_every is None:
    args.eval_every = max(1, args.steps // 20)
  if args.smoke:
    args.batch_size, args.context, args.width, args.layers = 4, 16, 32, 1

  start = time.perf_counter()
  ids, vocab = load_text(20_000 if args.smoke else None)
  split = int(0.9 * len(ids))
  val_rng = np.random.default_rng(12345)
  val_batches = jnp.asarray(np.stack(
      [batches(ids[split:], args.batch_size, args.context, val_rng)
       for _ in range(2 if args.smoke else 16)]))
  model = CharTransformer(vocab=len(vocab), width=args.width,
                          heads=max(1, args.width // 32), layers=args.layers,
                          context=args.context)
  val_loss = jax.jit(lambda params, val_batches: jnp.mean(jax.vmap(
      lambda b: loss_fn(params, model.apply, b))(val_batches)))
  results = [
      train(name, lr, (ids[:split], val_batches), model, val_loss, args,
            progress=not args.no_progress)
      for name, lr in (("AdaHessian", args.adahessian_lr),
                       ("AdaHessian-GNB", args.adahessian_gnb_lr),
                       ("Sophia-G", args.sophia_lr),
                       ("AdamW", args.adamw_lr))
      if name in args.optimizers
  ]
  print(f"\n{len(ids):,} characters of stdlib source, vocabulary "
        f"{len(vocab)}; {args.steps} steps of {args.batch_size}x"
        f"{args.context} characters")
  summary = {"script": "python examples/char_lm.py --optimizers "
                       + " ".join(args.optimizers),
             "steps": args.steps, "seed": args.seed,
             "characters": len(ids), "jax": jax.__version__,
             "optimizers": [{k: r[k] for k in ("name", "learning_rate",
                                               "final_val_loss",
                                               "ms_per_step", "finite")}
                            for r in results]}
  print(results_table(summary))
  default_run = (not args.smoke and args.steps == 600 and args.seed == 0
                 and len(results) == 4)
  path = args.results or (RESULTS if default_run else None)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(summary, f, indent=1)
      f.write("\n")
    print(f"wrote {path}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "char_lm_results.json"), "w") as f:
    json.dump(results, f)
  png = os.path.join(args.out, "char_lm_loss.png")
  plot(results, png)
  if not args.smoke and len(results) == 2:
    os.makedirs(os.path.dirname(DOCS_PLOT), exist_ok=True)
    shutil.copyfile(png, DOCS_PLOT)
  print(f"wrote {png} ({time.perf_counter() - start:.0f} s in all)")
  bad = [r["name"] for r in results if not r["finite"]]
  if bad:
    raise SystemExit(f"non-finite training loss for {bad}")


if __name__ == "__main__":
  main()
