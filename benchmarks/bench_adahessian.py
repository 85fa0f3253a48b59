"""AdaHessian's cost per step against Adam, the HVP floor and PyTorch.

Measures, in one process on CPU, for an MLP (0.93M parameters), a small CNN
and a small Transformer written in Flax:

* the floor F = time(jvp(grad(loss))) / time(grad(loss)): what the
  Hessian-vector product costs relative to the gradient it comes with;
* a jitted ``adahessian`` train step relative to a jitted ``optax.adam`` train
  step, for ``update_interval`` k = 1..5 with the static ``hessian_refresh``
  pattern (two compiled programs; target: at most 1.05 (1 + (F - 1)/k)), and
  with the plain ``update_interval=k`` (``lax.cond`` at run time);
* two ways of writing the step: "fused" (the documented one:
  ``aho.value_grad_and_hessian`` gives the loss, the gradient and the
  estimate from one jvp-over-grad pass, then ``update(..., hessian=...)``)
  and "plain" (``jax.grad``, and ``value_fn`` passed to ``update``, where the
  gradient is computed twice unless XLA merges the copies);
* ``n_samples`` s = 1, 2, 4, 8 (one primal pass, one tangent pass per probe);
* the optimizer state's bytes and the compiled step's memory (XLA's
  ``memory_analysis``) against Adam's, and the matmuls/convolutions left in the
  optimized HLO;
* with ``--torch``: the PyTorch reference AdaHessian (``torch-optimizer`` 0.3.0
  on ``torch`` 2.13.0 CPU, same architectures, batches and thread count).

Each variant is timed in short blocks; in every round all variants run once,
in a rotating order; a ratio is taken within each round and the median over
rounds is reported (the machine may be shared and noisy). ``--threads 1`` pins
the process to one core and reads process CPU time, which is much less
sensitive to other load than wall time; ``--threads 2`` (default) uses wall
time with both JAX and torch on two threads.

Usage::

  python benchmarks/bench_adahessian.py --quick            # smoke run
  python benchmarks/bench_adahessian.py --torch            # full, 2 threads
  python benchmarks/bench_adahessian.py --threads 1 --torch
"""

import argparse
import os
import sys


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description="AdaHessian cost per step vs Adam, the HVP floor and PyTorch")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: small batches, few variants and rounds")
  parser.add_argument("--torch", action="store_true",
                      help="also time the PyTorch reference (installs torch "
                           "2.13.0 and torch-optimizer 0.3.0 if missing)")
  parser.add_argument("--threads", type=int, choices=(1, 2), default=2,
                      help="1: pin to one core, time with process CPU time; "
                           "2: wall time, two threads (default)")
  parser.add_argument("--models", default="mlp,cnn,transformer")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--block", type=float, default=None,
                      help="seconds per timed block")
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--images", default=None,
                      help="folder for the plots (default: docs/images for a "
                           "full run, none for --quick); 'none' to skip")
  parser.add_argument("--tag", default=None,
                      help="suffix of the plot files (default: '' for 2 "
                           "threads, '_1thread' for 1)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  ARGS = parse_args()
  if ARGS.threads == 1:
    # JAX sizes its CPU thread pool from the affinity mask: one core, one
    # compute thread.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  if ARGS.torch:
    # With OpenMP's default spin-waiting, torch's two threads stall for tens
    # of ms at every barrier when the other core is busy (a shared machine):
    # measured 330 ms vs 28 ms per MLP Adam step. Passive waiting is fair.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# pylint: disable=wrong-import-position
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import flax.linen as nn  # noqa: E402

import adahessian_optax as aho  # noqa: E402

TORCH_VERSION = "2.13.0"
TORCH_OPTIMIZER_VERSION = "0.3.0"
# Paper (Yao et al., 2021), ResNet32 on CIFAR-10 (GPU): AdaHessian's time per
# iteration relative to Adam with the Hessian refreshed every k steps.
PAPER_COST = {1: 2.27, 5: 1.25}
TOLERANCE = 1.05
TORCH_TARGET = 0.6
# How the AdaHessian train step is written: "fused" (the documented step,
# aho.value_grad_and_hessian + update(hessian=...)) or "plain" (jax.grad, and
# the loss closure passed to update, which recomputes the gradient unless XLA
# merges the two copies).
STYLES = ("fused", "plain")

# Learning rates small enough that parameters barely move over the run, so
# every round times the same computation.
ADAM_LR = 1e-5
ADAHESSIAN_LR = 1e-5


# --------------------------------------------------------------------------
# Models (Flax) and their data.


class MLP(nn.Module):
  widths: tuple[int, ...] = (512, 512, 512)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.classes)(x)


class CNN(nn.Module):
  channels: tuple[int, ...] = (32, 64, 128)
  classes: int = 10

  @nn.compact
  def __call__(self, x):  # NHWC
    for i, c in enumerate(self.channels):
      x = nn.relu(nn.Conv(c, (3, 3), padding="SAME")(x))
      if i < len(self.channels) - 1:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes)(x)


class Block(nn.Module):
  d: int
  heads: int
  ff: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm(epsilon=1e-5)(x)
    qkv = nn.Dense(3 * d)(h).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, t, heads, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, -1e9)
    att = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + nn.Dense(d)(out)
    h = nn.LayerNorm(epsilon=1e-5)(x)
    h = nn.gelu(nn.Dense(self.ff)(h), approximate=True)
    return x + nn.Dense(d)(h)


class Transformer(nn.Module):
  vocab: int = 512
  seq: int = 64
  d: int = 128
  heads: int = 4
  ff: int = 512
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d)(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
    x = x + pos[: tokens.shape[1]]
    for _ in range(self.layers):
      x = Block(self.d, self.heads, self.ff)(x)
    x = nn.LayerNorm(epsilon=1e-5)(x)
    return nn.Dense(self.vocab)(x)


@dataclasses.dataclass
class Problem:
  name: str
  module: nn.Module
  inputs: np.ndarray
  labels: np.ndarray
  params: Any = None

  def loss(self, params, batch):
    x, y = batch
    logits = self.module.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_problems(names, quick):
  rng = np.random.default_rng(0)
  out = []
  for name in names:
    if name == "mlp":
      b = 32 if quick else 128
      x = rng.normal(size=(b, 784)).astype(np.float32)
      y = rng.integers(0, 10, size=(b,)).astype(np.int32)
      p = Problem("mlp", MLP(), x, y)
    elif name == "cnn":
      b = 4 if quick else 32
      x = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
      y = rng.integers(0, 10, size=(b,)).astype(np.int32)
      p = Problem("cnn", CNN(), x, y)
    elif name == "transformer":
      b = 2 if quick else 16
      m = Transformer()
      x = rng.integers(0, m.vocab, size=(b, m.seq)).astype(np.int32)
      y = rng.integers(0, m.vocab, size=(b, m.seq)).astype(np.int32)
      p = Problem("transformer", m, x, y)
    else:
      raise ValueError(f"unknown model {name!r}")
    p.params = p.module.init(jax.random.key(0), jnp.asarray(x))
    out.append(p)
  return out


def n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_bytes(tree):
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Timed variants.


@dataclasses.dataclass
class Variant:
  name: str
  unit: Callable[[], Any]  # runs `steps` steps and blocks until done
  steps: int = 1
  every: int = 1  # timed in rounds r with r % every == 0
  calls: int = 1  # units per timed block, set by calibration
  times: dict = dataclasses.field(default_factory=dict)  # round -> s/step


def jax_unit(fn):
  def unit():
    jax.block_until_ready(fn())
  return unit


def make_train_step(problem, tx, style, n_samples=1, compiler_options=None):
  """A jitted step; `style` is "adam", "plain" or "fused" (see STYLES)."""
  def step(params, opt_state, batch, refresh=None):
    loss = lambda p: problem.loss(p, batch)
    if style == "adam":
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    elif style == "plain":
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state,
                                     params, value_fn=loss,
                                     hessian_refresh=refresh)
    elif refresh is False:
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state,
                                     params, hessian_refresh=False)
    else:
      _, grads, hessian = aho.value_grad_and_hessian(loss, params, opt_state)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     hessian=hessian)
    return optax.apply_updates(params, updates), opt_state
  return jax.jit(step, static_argnames="refresh",
                 compiler_options=compiler_options)


def threaded(step, params, opt_state, batch, pattern):
  """A unit that runs `step` once per entry of `pattern` (the refresh flag)."""
  carry = [params, opt_state]

  def unit():
    p, s = carry
    for refresh in pattern:
      p, s = step(p, s, batch, refresh=refresh)
    jax.block_until_ready((p, s))
    carry[0], carry[1] = p, s
  return unit


def adahessian(k=None, s=1):
  """update_interval=None (the step decides each refresh) unless k is given."""
  return aho.adahessian(ADAHESSIAN_LR, key=0, update_interval=k, n_samples=s)


def build_jax_variants(problem, batch, style, ks, cond_ks, samples):
  """Variants named `<what>` (fused step) or `<what>@plain`.

  The fused style also builds the shared references (grad, hvp, adam), the
  `lax.cond` variants (which take the loss closure) and the n_samples ones.
  """
  fused = style == "fused"
  at = "" if fused else f"@{style}"
  params = problem.params
  loss = problem.loss
  grad_fn = jax.jit(jax.grad(loss))
  hvp_fn = jax.jit(lambda p, t, b: jax.jvp(
      jax.grad(lambda q: loss(q, b)), (p,), (t,)))
  tangent = optax.tree.random_like(jax.random.key(1), params,
                                   jax.random.normal)
  adam = optax.adam(ADAM_LR)
  adam_step = make_train_step(problem, adam, "adam")
  variants = []
  if fused:
    variants += [
        Variant("grad", jax_unit(lambda: grad_fn(params, batch))),
        Variant("hvp", jax_unit(lambda: hvp_fn(params, tangent, batch))),
        Variant("adam", threaded(adam_step, params, adam.init(params), batch,
                                 [None])),
    ]
  # One transformation serves every static interval: hessian_refresh decides.
  tx = adahessian()
  ah_step = make_train_step(problem, tx, style)
  for k in ks:
    pattern = [True] + [False] * (k - 1)
    variants.append(Variant(f"static_k{k}" + at, threaded(
        ah_step, params, tx.init(params), batch, pattern), steps=k))
  for k in cond_ks:
    txk = adahessian(k=k)
    step_k = make_train_step(problem, txk, "plain")
    variants.append(Variant(f"cond_k{k}", threaded(
        step_k, params, txk.init(params), batch, [None] * k), steps=k,
                            every=2))
  for s in samples:
    if s > 1:  # static_k1 is s = 1
      txs = adahessian(s=s)
      step_s = make_train_step(problem, txs, style, n_samples=s)
      variants.append(Variant(f"samples_{s}", threaded(
          step_s, params, txs.init(params), batch, [True])))
  programs = {
      "grad": grad_fn.lower(params, batch),
      "hvp": hvp_fn.lower(params, tangent, batch),
      "adam": adam_step.lower(params, adam.init(params), batch),
      "adahessian": ah_step.lower(params, tx.init(params), batch,
                                  refresh=True),
      "adahessian (no refresh)": ah_step.lower(params, tx.init(params), batch,
                                               refresh=False),
  }
  states = {"adam": adam.init(params), "adahessian": tx.init(params)}
  return variants, programs, states


# --------------------------------------------------------------------------
# Compiled-program checks: duplicate gradient removed, memory.


def heavy_ops(compiled_text):
  """Counts matmuls and convolutions in optimized HLO (fused ones included)."""
  dots = len(re.findall(r"\bdot\(", compiled_text))
  convs = len(re.findall(r"\bconvolution\(", compiled_text))
  return dots + convs


def compiled_report(lowered):
  compiled = lowered.compile()
  m = compiled.memory_analysis()
  out = {
      "heavy_ops": heavy_ops(compiled.as_text()),
      "temp": int(m.temp_size_in_bytes),
      "argument": int(m.argument_size_in_bytes),
      "output": int(m.output_size_in_bytes),
      "alias": int(m.alias_size_in_bytes),
  }
  out["temp+argument"] = out["temp"] + out["argument"]
  return out


# --------------------------------------------------------------------------
# PyTorch reference.


def ensure_torch():
  """Installs torch 2.13.0 (first, CPU wheel) and torch-optimizer 0.3.0."""
  def installed():
    try:
      import torch  # noqa: F401
      import torch_optimizer  # noqa: F401
    except ImportError:
      return None
    return torch.__version__, torch_optimizer.__version__

  have = installed()
  if have and have[0].split("+")[0] == TORCH_VERSION and have[1] == TORCH_OPTIMIZER_VERSION:
    return
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  # torch first, pinned: any other request for torch pulls GBs of CUDA wheels.
  subprocess.check_call(pip + [f"torch=={TORCH_VERSION}"])
  # torch-optimizer needs only torch and pytorch-ranger; --no-deps keeps pip
  # from resolving torch again.
  subprocess.check_call(pip + ["--no-deps", "pytorch-ranger>=0.1.1",
                               f"torch-optimizer=={TORCH_OPTIMIZER_VERSION}"])
  if installed() is None:
    raise RuntimeError("torch / torch-optimizer did not install")


def torch_models():
  import torch
  from torch import nn as tnn
  import torch.nn.functional as F

  class TMLP(tnn.Module):
    def __init__(self, widths=(512, 512, 512), classes=10):
      super().__init__()
      dims = (784,) + tuple(widths)
      self.hidden = tnn.ModuleList(
          tnn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
      self.out = tnn.Linear(dims[-1], classes)

    def forward(self, x):
      for layer in self.hidden:
        x = F.relu(layer(x))
      return self.out(x)

  class TCNN(tnn.Module):
    def __init__(self, channels=(32, 64, 128), classes=10):
      super().__init__()
      dims = (3,) + tuple(channels)
      self.convs = tnn.ModuleList(
          tnn.Conv2d(a, b, 3, padding=1) for a, b in zip(dims[:-1], dims[1:]))
      self.out = tnn.Linear(dims[-1], classes)

    def forward(self, x):  # NCHW
      for i, conv in enumerate(self.convs):
        x = F.relu(conv(x))
        if i < len(self.convs) - 1:
          x = F.avg_pool2d(x, 2)
      return self.out(x.mean(dim=(2, 3)))

  class TBlock(tnn.Module):
    def __init__(self, d, heads, ff):
      super().__init__()
      self.heads = heads
      self.ln1 = tnn.LayerNorm(d, eps=1e-5)
      self.qkv = tnn.Linear(d, 3 * d)
      self.proj = tnn.Linear(d, d)
      self.ln2 = tnn.LayerNorm(d, eps=1e-5)
      self.fc1 = tnn.Linear(d, ff)
      self.fc2 = tnn.Linear(ff, d)

    def forward(self, x):
      b, t, d = x.shape
      hd = d // self.heads
      qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, hd)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
      mask = torch.ones(t, t, dtype=torch.bool).tril()
      logits = logits.masked_fill(~mask, -1e9)
      att = torch.softmax(logits, dim=-1)
      out = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
      x = x + self.proj(out)
      h = F.gelu(self.fc1(self.ln2(x)), approximate="tanh")
      return x + self.fc2(h)

  class TTransformer(tnn.Module):
    def __init__(self, vocab=512, seq=64, d=128, heads=4, ff=512, layers=2):
      super().__init__()
      self.embed = tnn.Embedding(vocab, d)
      self.pos = tnn.Parameter(0.02 * torch.randn(seq, d))
      self.blocks = tnn.ModuleList(TBlock(d, heads, ff) for _ in range(layers))
      self.ln = tnn.LayerNorm(d, eps=1e-5)
      self.out = tnn.Linear(d, vocab)

    def forward(self, tokens):
      x = self.embed(tokens) + self.pos[: tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.out(self.ln(x))

  return {"mlp": TMLP, "cnn": TCNN, "transformer": TTransformer}


def build_torch_variants(problem, threads):
  import torch
  import torch.nn.functional as F
  import torch_optimizer

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  x = torch.from_numpy(problem.inputs)
  if problem.name == "cnn":
    x = x.permute(0, 3, 1, 2).contiguous()
  if problem.name == "transformer":
    x = x.long()
  y = torch.from_numpy(problem.labels).long()
  cls = torch_models()[problem.name]

  def loss_fn(model):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

  variants = []
  count = None
  for name in ("torch_adam", "torch_adahessian"):
    model = cls()
    count = sum(p.numel() for p in model.parameters())
    if name == "torch_adam":
      opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
      create_graph = False
    else:
      # torch-optimizer's hessian_power k acts on sqrt(v): k=1 is the paper's.
      opt = torch_optimizer.Adahessian(model.parameters(), lr=ADAHESSIAN_LR,
                                       hessian_power=1.0)
      create_graph = True

    def unit(model=model, opt=opt, create_graph=create_graph):
      opt.zero_grad(set_to_none=True)
      loss_fn(model).backward(create_graph=create_graph)
      opt.step()
    variants.append(Variant(name, unit))
  return variants, count


# --------------------------------------------------------------------------
# Timing.


def calibrate(variants, block_s, clock):
  for v in variants:
    v.unit()  # compile / first call
    v.unit()
    t0 = clock()
    v.unit()
    dt = clock() - t0
    v.calls = max(1, int(round(block_s / max(dt, 1e-6))))


def run_rounds(variants, rounds, clock):
  n = len(variants)
  for r in range(rounds):
    order = variants[r % n:] + variants[:r % n]
    if r % 2:
      order = order[::-1]
    for v in order:
      if r % v.every:
        continue
      t0 = clock()
      for _ in range(v.calls):
        v.unit()
      v.times[r] = (clock() - t0) / (v.calls * v.steps)
    print(f"  round {r + 1}/{rounds}", end="\r", flush=True)
  print(" " * 30, end="\r")


def ratio(by, a, b):
  """Median over rounds of time(a) / time(b), and its quartiles."""
  ta, tb = by[a].times, by[b].times
  r = np.asarray([ta[i] / tb[i] for i in ta if i in tb])
  return {"median": float(np.median(r)), "q25": float(np.quantile(r, 0.25)),
          "q75": float(np.quantile(r, 0.75)), "n": int(r.size)}


def over_floor(by, k, at):
  """Median over rounds of (step/Adam) / (1 + (F - 1)/k), F from that round."""
  names = [f"static_k{k}{at}", "adam", "hvp", "grad"]
  t = [by[n].times for n in names]
  rounds = set(t[0]).intersection(*t[1:])
  r = np.asarray([(t[0][i] / t[1][i]) / (1 + (t[2][i] / t[3][i] - 1) / k)
                  for i in sorted(rounds)])
  return {"median": float(np.median(r)), "q25": float(np.quantile(r, 0.25)),
          "q75": float(np.quantile(r, 0.75)), "n": int(r.size)}


def med_ms(v):
  return float(np.median(list(v.times.values())) * 1e3)


# --------------------------------------------------------------------------
# Report.


def fmt(x, nd=2):
  return "—" if x is None else f"{x:.{nd}f}"


def bound(floor, k):
  return TOLERANCE * (1 + (floor - 1) / k)


def tables(results, ks, samples, cond_ks, with_torch, threads):
  lines = []
  p = lines.append
  clock = ("process CPU time, 1 core" if threads == 1
           else "wall time, 2 threads")
  p("### Cost per step x Adam, static `hessian_refresh` "
    f"(median of per-round ratios; {clock})")
  p("")
  p("Each cell: cost x Adam, and in brackets that cost over the floor's "
    "1 + (F − 1)/k, taken within each round (target: ≤ 1.05).")
  p("")
  p("| model | step | floor F | " + " | ".join(f"k={k}" for k in ks) + " |")
  p("|" + "---|" * (3 + len(ks)))
  for name, res in results.items():
    for config, c in res["configs"].items():
      row = [name, config, fmt(c["floor"]["median"])]
      for k in ks:
        rel = c["over_floor"][k]["median"]
        row.append(f"{fmt(c['static'][k]['median'])} ({fmt(rel)})"
                   + ("" if rel <= TOLERANCE else " ✗"))
      p("| " + " | ".join(row) + " |")
  p("| paper (ResNet32, GPU) | | — | " +
    " | ".join(fmt(PAPER_COST.get(k)) for k in ks) + " |")
  p("")
  p("### Plain `update_interval=k` (`lax.cond` at run time), cost x Adam")
  p("")
  p("| model | " + " | ".join(f"k={k}" for k in cond_ks) + " |")
  p("|" + "---|" * (1 + len(cond_ks)))
  for name, res in results.items():
    c = res["configs"]["fused"]
    p("| " + " | ".join([name] + [fmt(c["cond"][k]["median"])
                                  for k in cond_ks]) + " |")
  p("")
  p("### `n_samples`: cost x Adam (k=1), and step time relative to s=1")
  p("")
  big = [s for s in samples if s > 1]
  p("| model | " + " | ".join(f"s={s}" for s in samples) + " | " +
    " | ".join(f"T(s={s})/T(1)" for s in big) + " |")
  p("|" + "---|" * (1 + len(samples) + len(big)))
  for name, res in results.items():
    c = res["configs"]["fused"]
    row = [name] + [fmt(c["samples"][s]["median"]) for s in samples]
    row += [fmt(c["samples_rel"][s]["median"]) for s in big]
    p("| " + " | ".join(row) + " |")
  p("")
  p("### Milliseconds per step (median)")
  p("")
  cols = ["grad", "hvp", "adam", "static_k1", "static_k1@plain"]
  if with_torch:
    cols += ["torch_adam", "torch_adahessian"]
  p("| model | " + " | ".join(
      c.replace("static_k1@plain", "adahessian (plain)").replace(
          "static_k1", "adahessian (fused)") for c in cols) + " |")
  p("|" + "---|" * (1 + len(cols)))
  for name, res in results.items():
    p("| " + " | ".join([name] + [fmt(res["ms"].get(c), 1) for c in cols])
      + " |")
  p("")
  p("### Memory (bytes)")
  p("")
  p("| model | params | Adam state | AdaHessian state | difference | "
    "Adam step temp+args | AdaHessian step temp+args | ratio | "
    "no-refresh step | HVP / grad programs |")
  p("|" + "---|" * 10)
  for name, res in results.items():
    m = res["memory"]
    pr = m["programs"]
    sa, sh = m["state_bytes"]["adam"], m["state_bytes"]["adahessian"]
    a, h = pr["adam"]["temp+argument"], pr["adahessian"]["temp+argument"]
    nr = pr["adahessian (no refresh)"]["temp+argument"]
    fl = pr["hvp"]["temp+argument"] / pr["grad"]["temp+argument"]
    p(f"| {name} | {m['param_bytes']:,} | {sa:,} | {sh:,} | {sh - sa:+,} | "
      f"{a:,} | {h:,} | {h / a:.2f} | {nr / a:.2f} | {fl:.2f} |")
  p("")
  p("### Matmuls + convolutions in the optimized HLO")
  p("")
  p("| model | step | grad | hvp | Adam step | AdaHessian step | "
    "no-refresh step |")
  p("|---|---|---|---|---|---|---|")
  for name, res in results.items():
    for config, ops in res["heavy_ops"].items():
      p("| " + " | ".join([name, config] + [str(ops[c]) for c in (
          "grad", "hvp", "adam", "adahessian", "adahessian (no refresh)")])
        + " |")
  if with_torch:
    p("")
    p("### Against PyTorch (torch-optimizer 0.3.0 `Adahessian`, torch "
      f"{TORCH_VERSION} CPU, {threads} thread(s))")
    p("")
    p("| model | parameters (both) | ours / torch, AdaHessian step | "
      "ours / torch, Adam step | torch AdaHessian x torch Adam |")
    p("|---|---|---|---|---|")
    for name, res in results.items():
      t = res["torch"]
      ours = t["ours_vs_torch"]["median"]
      p(f"| {name} | {t['params']:,} | {fmt(ours)}"
        f"{'' if ours <= TORCH_TARGET else ' ✗'} | "
        f"{fmt(t['adam_vs_torch']['median'])} | "
        f"{fmt(t['torch_cost']['median'])} |")
  return "\n".join(lines)


def check_targets(results, ks, samples, with_torch):
  out = []
  for name, res in results.items():
    for config, c in res["configs"].items():
      f = c["floor"]["median"]
      for k in ks:
        got = c["static"][k]["median"]
        rel = c["over_floor"][k]["median"]
        out.append((f"{name} [{config}]: k={k} costs {got:.2f}x Adam = "
                    f"{rel:.3f} x (1+(F-1)/k) (F={f:.2f}); target <= "
                    f"{TOLERANCE}", rel <= TOLERANCE))
    sa = res["memory"]["state_bytes"]
    diff = sa["adahessian"] - sa["adam"]
    out.append((f"{name}: optimizer state = Adam's + {diff} bytes",
                0 <= diff <= 64))
    c = res["configs"]["fused"]
    for s in samples:
      if s > 1:
        rel = c["samples_rel"][s]["median"]
        out.append((f"{name}: n_samples={s} step costs {rel:.2f}x the s=1 "
                    f"step (sub-linear: < {s})", rel < s))
    if with_torch:
      r = res["torch"]["ours_vs_torch"]["median"]
      out.append((f"{name}: our AdaHessian step / torch-optimizer's = "
                  f"{r:.2f}, target <= {TORCH_TARGET}", r <= TORCH_TARGET))
  return out


def plot(results, ks, samples, cond_ks, with_torch, image_dir, tag, threads):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(image_dir, exist_ok=True)
  names = list(results)
  paths = []
  clock = "CPU time, 1 core" if threads == 1 else "wall time, 2 threads"

  def save(fig, stem):
    fig.tight_layout()
    path = os.path.join(image_dir, f"{stem}{tag}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names), 3.8),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    res = results[name]
    c = res["configs"]["fused"]
    f = c["floor"]["median"]
    kk = np.asarray(ks, float)
    floor_curve = [1 + (f - 1) / k for k in ks]
    ax.fill_between(kk, floor_curve, [bound(f, k) for k in ks], color="0.85",
                    label="floor 1+(F−1)/k … +5%")
    ax.plot(kk, floor_curve, "k--", lw=1)
    ax.plot(kk, [c["static"][k]["median"] for k in ks], "o-",
            label="fused step (documented)")
    if "plain" in res["configs"]:
      c2 = res["configs"]["plain"]
      ax.plot(kk, [c2["static"][k]["median"] for k in ks], "^:",
              label="plain step (value_fn to update)")
    pk = sorted(PAPER_COST)
    ax.plot(pk, [PAPER_COST[k] for k in pk], "s", color="tab:red",
            label="paper (ResNet32, GPU)")
    ax.set_title(f"{name}: F = {f:.2f}")
    ax.set_xlabel("update_interval k")
    ax.set_ylabel("time per step / Adam's")
    ax.set_xticks(ks)
    ax.set_ylim(bottom=0.8)
    ax.legend(fontsize=7)
  fig.suptitle(f"AdaHessian cost per step x Adam ({clock})", fontsize=10)
  save(fig, "bench_interval")

  if cond_ks:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in names:
      c = results[name]["configs"]["fused"]
      line, = ax.plot(cond_ks, [c["cond"][k]["median"] for k in cond_ks],
                      "x:", label=f"{name}: lax.cond")
      ax.plot(cond_ks, [c["static"][k]["median"] for k in cond_ks], "o-",
              color=line.get_color(), label=f"{name}: static refresh")
    ax.set_yscale("log")
    ax.set_xticks(cond_ks)
    ax.set_xlabel("update_interval k")
    ax.set_ylabel("time per step / Adam's (log)")
    ax.set_title(f"lax.cond vs two compiled programs ({clock})", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    save(fig, "bench_cond")

  fig, ax = plt.subplots(figsize=(5, 3.6))
  for name in names:
    c = results[name]["configs"]["fused"]
    ax.plot(samples, [1.0] + [c["samples_rel"][s]["median"] for s in samples
                              if s > 1], "o-", label=name)
  ax.plot(samples, samples, "k:", label="linear (s separate passes)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xticks(samples)
  ax.set_xticklabels([str(s) for s in samples])
  ax.set_xlabel("n_samples s")
  ax.set_ylabel("step time / (s=1 step time)")
  ax.set_title(f"One primal pass, one tangent pass per probe ({clock})",
               fontsize=9)
  ax.legend(fontsize=8)
  save(fig, "bench_samples")

  if with_torch:
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    x = np.arange(len(names))
    w = 0.2
    series = [("adam", "optax.adam"), ("static_k1", "adahessian-optax"),
              ("torch_adam", "torch.optim.Adam"),
              ("torch_adahessian", "torch-optimizer Adahessian")]
    for i, (col, label) in enumerate(series):
      ax.bar(x + (i - 1.5) * w, [results[n]["ms"][col] for n in names], w,
             label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median, log)")
    ax.set_title(f"Same models and batches, CPU ({clock})", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, "bench_torch")
  return paths


# --------------------------------------------------------------------------


def main(args):
  quick = args.quick
  ks = [1, 2] if quick else [1, 2, 3, 4, 5]
  cond_ks = [2] if quick else [2, 3, 4, 5]
  samples = [1, 2] if quick else [1, 2, 4, 8]
  rounds = args.rounds or (4 if quick else 20)
  block = args.block or (0.02 if quick else 0.1)
  images = args.images or (None if quick else os.path.join(ROOT, "docs",
                                                           "images"))
  if images == "none":
    images = None
  tag = args.tag if args.tag is not None else (
      "_1thread" if args.threads == 1 else "")
  clock = time.process_time if args.threads == 1 else time.perf_counter
  configs = list(STYLES)

  if args.torch:
    ensure_torch()
    import torch
    import torch_optimizer
    # torch-optimizer's documented use is backward(create_graph=True).
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")

  print(f"jax {jax.__version__}, optax {optax.__version__}, flax "
        f"{importlib_version('flax')}, adahessian_optax {aho.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"affinity {sorted(os.sched_getaffinity(0))}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}")
  if args.torch:
    print(f"torch {torch.__version__} ({args.threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
          f"torch-optimizer {torch_optimizer.__version__}")
  print(f"clock: {'process CPU time' if args.threads == 1 else 'wall'}; "
        f"rounds={rounds}, block={block}s; k={ks}, lax.cond k={cond_ks}, "
        f"n_samples={samples}; step styles {configs}")

  results = {}
  for problem in make_problems(args.models.split(","), quick):
    t0 = time.perf_counter()
    print(f"\n[{problem.name}] {n_params(problem.params):,} parameters, input "
          f"{problem.inputs.shape}; compiling...", flush=True)
    batch = (jnp.asarray(problem.inputs), jnp.asarray(problem.labels))
    variants, programs, heavy = [], {}, {}
    states = None
    for config in configs:
      default = config == "fused"
      v, progs, st = build_jax_variants(
          problem, batch, config, ks, cond_ks if default else [],
          samples if default else [1])
      variants += v
      reports = {name: compiled_report(lo) for name, lo in progs.items()}
      heavy[config] = {name: r["heavy_ops"] for name, r in reports.items()}
      if default:
        programs, states = reports, st
    torch_count = None
    if args.torch:
      tv, torch_count = build_torch_variants(problem, args.threads)
      variants += tv
      if torch_count != n_params(problem.params):
        raise RuntimeError(f"{problem.name}: the torch model has {torch_count}"
                           f" parameters, the Flax one {n_params(problem.params)}")
    calibrate(variants, block, clock)
    print(f"  compiled and calibrated in {time.perf_counter() - t0:.0f}s; "
          "timing...", flush=True)
    run_rounds(variants, rounds, clock)
    by = {v.name: v for v in variants}
    res = {
        "params": n_params(problem.params),
        "input": list(problem.inputs.shape),
        "configs": {},
        "ms": {v.name: med_ms(v) for v in variants},
        "times_s": {v.name: [v.times[r] for r in sorted(v.times)]
                    for v in variants},
        "memory": {
            "programs": programs,
            "state_bytes": {k: tree_bytes(s) for k, s in states.items()},
            "param_bytes": tree_bytes(problem.params),
        },
        "heavy_ops": heavy,
    }
    for config in configs:
      at = "" if config == "fused" else f"@{config}"
      c = {"floor": ratio(by, "hvp", "grad"),
           "static": {k: ratio(by, f"static_k{k}{at}", "adam")
                      for k in ks},
           "over_floor": {k: over_floor(by, k, at) for k in ks}}
      if config == "fused":
        c["cond"] = {k: ratio(by, f"cond_k{k}", "adam") for k in cond_ks}
        c["samples"] = {s: ratio(by, "static_k1" if s == 1 else
                                 f"samples_{s}", "adam") for s in samples}
        c["samples_rel"] = {s: ratio(by, f"samples_{s}", "static_k1")
                            for s in samples if s > 1}
      res["configs"][config] = c
    if args.torch:
      res["torch"] = {
          "params": torch_count,
          "ours_vs_torch": ratio(by, "static_k1", "torch_adahessian"),
          "adam_vs_torch": ratio(by, "adam", "torch_adam"),
          "torch_cost": ratio(by, "torch_adahessian", "torch_adam"),
      }
    results[problem.name] = res
    c = res["configs"]["fused"]
    print(f"  floor {c['floor']['median']:.2f}, k=1 "
          f"{c['static'][1]['median']:.2f}x Adam "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

  print()
  print(tables(results, ks, samples, cond_ks, args.torch, args.threads))
  print("\n### Targets\n")
  for text, ok in check_targets(results, ks, samples, args.torch):
    print(f"- [{'x' if ok else ' '}] {text}{'' if ok else '  <-- MISSED'}")
  if images:
    for path in plot(results, ks, samples, cond_ks, args.torch, images, tag,
                     args.threads):
      print(f"wrote {os.path.relpath(path, ROOT)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "rounds": rounds, "block_s": block,
                 "threads": args.threads, "quick": quick}, f, indent=1)
    print(f"wrote {args.json}")
  return results


def importlib_version(name):
  from importlib import metadata
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return "?"


if __name__ == "__main__":
  main(ARGS)
