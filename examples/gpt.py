"""AdaHessian at GPT-2 scale: a GPT-2-class decoder in Flax NNX, sharded.

A pre-LayerNorm decoder with GPT-2's shapes (the output layer tied to the
token embedding, a fused query-key-value projection, a GELU MLP of 4x the
width) in configurable sizes: ``124M`` is GPT-2 small (12 layers, width
768, 12 heads, vocabulary 50257, context 1024), ``355M`` and ``774M`` GPT-2
medium and large, ``tiny`` and ``mini`` (vocabulary 256) are for tests and
CPUs. The blocks are one stack run by ``nnx.scan`` (one compiled body
whatever the depth). It is trained on bytes: the source of a few Python
standard-library modules read from the running interpreter (no download),
so token ids are below 256 and any ``--vocab-size`` of at least 256 works.

Options (see ``docs/scale.md``):

- ``--attention``: ``xla`` (:func:`jax.nn.dot_product_attention` with
  ``implementation="xla"``, the default), ``cudnn`` (its cuDNN kernel, on an
  NVIDIA GPU with bf16 compute; elsewhere an error naming the cause),
  ``flash`` (Pallas's ``jax.experimental.pallas.ops.gpu.attention.mha``,
  with ``BlockSizes`` for all six blocks; interpreted on a CPU) or
  ``reference`` (``mha_reference``, the kernel's plain twin).
- ``--remat``: rematerialise every block (``nnx.remat``) in the backward
  pass.
- ``--dtype bfloat16``: bf16 compute with float32 params and loss.
- ``--devices N [M ...]``: FSDP over an N-device mesh with automatic axes:
  every matrix sharded on its largest axis divisible by N (vectors
  replicated), the batch split on its leading axis over the same devices
  (:class:`jax.sharding.NamedSharding`) and the activations constrained to
  that split; optimizer state follows the params. Several counts train the
  same run on each and report the largest difference from the first. On a
  CPU, simulate devices with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
- ``--chunks c``: AdaHessian's Hessian-vector product in ``c`` strided
  pieces of the batch (``aho.sub_batch_value_fn(..., chunks=c)``).
- ``--plain``: AdaHessian refreshes in its own ``lax.cond`` every
  ``--hessian-interval`` steps (the plain call), instead of the fused step
  chosen on the host; ``--gnb-stride k``: the GNB estimate on every k-th
  sequence (Sophia-G, and AdaHessian-GNB with ``--plain``).

Optimizers: ``AdamW``; ``AdaHessian`` (Hutchinson's estimate, the fused step
``aho.value_grad_and_hessian`` every ``--hessian-interval`` steps and a
plain gradient on the others); ``AdaHessian-GNB``
(``estimator=aho.gnb_estimator(key)``, the loss as ``aho.ggn(logits_fn,
aho.SoftmaxCrossEntropy(labels))``); ``Sophia-G``
(``optax.contrib.sophia(..., hessian_diagonal_fn=aho.gnb_estimator(key))``,
refreshing inside its own ``lax.cond``).

**A kernel with a custom VJP** (``--attention flash`` or ``cudnn``) has no
forward-mode rule. AdamW, AdaHessian-GNB and Sophia-G need gradients only
and train through it unchanged. AdaHessian (Hutchinson) takes its gradient
through the kernel and its Hessian-vector product from a separate
curvature closure, the same params through XLA attention
(``curvature_value_fn``): a refresh step costs one gradient more than the
fused step (the product's own gradient is dropped) and holds XLA
attention's memory in the product's pass.

    python examples/gpt.py                      # mini, 4 optimizers
    python examples/gpt.py --smoke              # seconds, for tests
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python examples/gpt.py --devices 1 8 --steps 200
    python examples/gpt.py --config 124M --remat --chunks 4 \
        --dtype bfloat16 --attention cudnn --devices 8 --batch-size 32
"""

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import time
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_optax as aho

MODULES = ("argparse", "dataclasses", "functools", "statistics", "fractions",
           "contextlib", "heapq", "textwrap", "string", "bisect")
OPTIMIZERS = ("AdamW", "AdaHessian", "AdaHessian-GNB", "Sophia-G")
ATTENTION = ("xla", "cudnn", "flash", "reference")
# Attention kernels with a custom VJP: no forward-mode rule, so Hutchinson's
# Hessian-vector product takes a separate closure with XLA attention.
KERNELS = ("cudnn", "flash")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """A decoder's shape and how it computes.

  Attributes:
    vocab_size: rows of the (tied) token embedding.
    context: the longest sequence (rows of the position embedding).
    width: the residual stream's width.
    layers: decoder blocks.
    heads: attention heads (``width`` must divide by it).
    attention: ``xla``, ``cudnn``, ``flash`` or ``reference``.
    remat: rematerialise each block in the backward pass.
    dtype: the compute dtype; params are float32 whatever it is.
    flash_block: the flash kernel's block size (all six of its blocks, cut
      to the sequence length).
  """

  vocab_size: int = 50257
  context: int = 1024
  width: int = 768
  layers: int = 12
  heads: int = 12
  attention: str = "xla"
  remat: bool = False
  dtype: str = "float32"
  flash_block: int = 128


CONFIGS = {
    "tiny": GPTConfig(vocab_size=256, context=32, width=32, layers=2,
                      heads=2),
    "mini": GPTConfig(vocab_size=256, context=128, width=128, layers=4,
                      heads=4),
    "124M": GPTConfig(width=768, layers=12, heads=12),
    "355M": GPTConfig(width=1024, layers=24, heads=16),
    "774M": GPTConfig(width=1280, layers=36, heads=20),
}


def attend(q, k, v, implementation: str, flash_block: int = 128):
  """Causal attention of ``(batch, seq, heads, head_dim)`` arrays."""
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation=implementation)
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  scale = 1.0 / math.sqrt(q.shape[-1])
  if implementation == "reference":
    return pallas_attention.mha_reference(q, k, v, None, sm_scale=scale,
                                          causal=True)
  if implementation == "flash":
    b = min(flash_block, q.shape[1])
    blocks = pallas_attention.BlockSizes(
        block_q=b, block_k=b, block_q_dkv=b, block_kv_dkv=b, block_q_dq=b,
        block_kv_dq=b)
    return pallas_attention.mha(
        q, k, v, None, sm_scale=scale, causal=True, block_sizes=blocks,
        interpret=jax.default_backend() != "gpu")
  raise ValueError(f"attention must be one of {ATTENTION}, got "
                   f"{implementation!r}")


def check_attention(cfg: GPTConfig) -> None:
  """Raises an error naming the cause when ``cfg.attention`` cannot run."""
  if cfg.attention not in ATTENTION:
    raise ValueError(f"--attention must be one of {ATTENTION}, got "
                     f"{cfg.attention!r}")
  if cfg.attention != "cudnn":
    return
  if cfg.dtype != "bfloat16":
    raise ValueError(
        "--attention cudnn needs --dtype bfloat16: cuDNN's fused attention "
        "takes bf16 or fp16 inputs, not float32")
  x = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
  try:
    jax.jit(functools.partial(attend, implementation="cudnn"))(x, x, x)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        "--attention cudnn: jax.nn.dot_product_attention("
        "implementation='cudnn') cannot run here (backend "
        f"{jax.default_backend()!r}): {type(e).__name__}: "
        f"{str(e).rstrip('.')}. It needs an "
        "NVIDIA GPU with cuDNN 8.9 or later; use --attention flash (a Pallas "
        "kernel, interpreted on a CPU) or --attention xla instead") from e


def batch_constraint(x):
  """``x`` split over the mesh's ``fsdp`` axis on its leading (batch) axis,
  when the step is traced under ``jax.set_mesh`` with one.

  Without it XLA's sharding propagation may follow the params' sharding into
  the activations and gather the batch on every device (per device, 8x the
  activations of a one-device step in this example).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names:
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec("fsdp"))


def _normal(std):
  return nnx.initializers.normal(std)


class Block(nnx.Module):
  """A pre-LayerNorm decoder block: causal self-attention, then the MLP."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    dtype, width = jnp.dtype(cfg.dtype), cfg.width
    # GPT-2 scales the residual projections by 1/sqrt(2 * layers).
    proj_init = _normal(0.02 / math.sqrt(2 * cfg.layers))
    self.heads, self.flash_block = cfg.heads, cfg.flash_block
    self.ln_1 = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, dtype=dtype,
                          kernel_init=_normal(0.02), rngs=rngs)
    self.proj = nnx.Linear(width, width, dtype=dtype, kernel_init=proj_init,
                           rngs=rngs)
    self.ln_2 = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, dtype=dtype,
                         kernel_init=_normal(0.02), rngs=rngs)
    self.out = nnx.Linear(4 * width, width, dtype=dtype,
                          kernel_init=proj_init, rngs=rngs)

  def __call__(self, x, attention: str):
    batch, seq, width = x.shape
    qkv = self.qkv(self.ln_1(x)).reshape(
        batch, seq, 3, self.heads, width // self.heads)
    y = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attention,
               self.flash_block)
    x = x + self.proj(y.reshape(batch, seq, width))
    x = x + self.out(nnx.gelu(self.fc(self.ln_2(x)), approximate=True))
    return batch_constraint(x)


class GPT(nnx.Module):
  """GPT-2's decoder: token and position embeddings, blocks, a final
  LayerNorm and the token embedding again as the output layer."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = nnx.Embed(cfg.vocab_size, cfg.width, dtype=jnp.dtype(cfg.dtype),
                         embedding_init=_normal(0.02), rngs=rngs)
    self.wpe = nnx.Param(_normal(0.01)(rngs.params(),
                                       (cfg.context, cfg.width)))
    # The blocks as one stack (every param with a leading layer axis), run
    # by a scan: one compiled body whatever the depth, and with remat a
    # backward loop that recomputes one block at a time.
    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = stack(rngs)
    self.ln_f = nnx.LayerNorm(cfg.width, epsilon=1e-5,
                              dtype=jnp.dtype(cfg.dtype), rngs=rngs)

  def __call__(self, tokens, attention: Optional[str] = None):
    """Logits (in the compute dtype) of the next token at each position.

    ``attention`` overrides the configuration's implementation (the
    curvature closure's XLA attention).
    """
    attention = attention or self.cfg.attention
    x = self.wte(tokens) + self.wpe[:tokens.shape[1]].astype(self.cfg.dtype)
    x = batch_constraint(x)
    def body(block, h):
      return block(h, attention)

    if self.cfg.remat:
      body = nnx.remat(body)
    x = nnx.scan(lambda h, block: body(block, h), in_axes=(nnx.Carry, 0),
                 out_axes=nnx.Carry)(x, self.blocks)
    return batch_constraint(self.wte.attend(self.ln_f(x)))


def build(cfg: GPTConfig, seed: int = 0, abstract: bool = False):
  """``(graphdef, params)`` of a new model; with ``abstract``, params as
  :class:`jax.ShapeDtypeStruct` (nothing allocated)."""
  make = lambda: GPT(cfg, rngs=nnx.Rngs(seed))
  model = nnx.eval_shape(make) if abstract else make()
  return nnx.split(model, nnx.Param)


def spatial_rules(cfg: GPTConfig):
  """AdaHessian's spatial averaging for the model: every dense kernel
  averaged in blocks of 32 input features (the paper's Transformer
  setting), from the model's own layers (``aho.spatial_rules``; the stacked
  layers keep their own curvature)."""
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  return aho.spatial_rules(model, block_size=32)


def param_count(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# The loss, as a closure and as model outputs with a loss of them.

def logits_fn(graphdef, params, tokens, attention=None):
  return nnx.merge(graphdef, params)(tokens, attention)


def loss_fn(params, batch, *, graphdef, attention=None):
  """Mean next-token cross-entropy (float32) of ``(B, T + 1)`` tokens."""
  logits = logits_fn(graphdef, params, batch[:, :-1], attention)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:]).mean()


def ggn_loss(graphdef, batch, attention=None) -> aho.GGN:
  """The same loss as model outputs and a loss of them: what the
  Gauss-Newton-Bartlett estimator draws labels from."""
  return aho.ggn(lambda p: logits_fn(graphdef, p, batch[:, :-1], attention),
                 aho.SoftmaxCrossEntropy(batch[:, 1:]))


def curvature_value_fn(cfg: GPTConfig, graphdef, batch, chunks: int = 1):
  """Hutchinson's loss closure: the model's own attention, or XLA attention
  in place of a kernel with a custom VJP (which forward mode cannot pass).

  With ``chunks > 1`` the batch's products are taken in that many pieces one
  after the other (``aho.sub_batch_value_fn``), whose pieces are strided
  (piece ``i`` holds rows ``i, c + i, ...``): with the batch split over
  devices on its leading axis every piece keeps rows on every device.
  """
  attention = "xla" if cfg.attention in KERNELS else cfg.attention
  loss = functools.partial(loss_fn, graphdef=graphdef, attention=attention)
  if chunks == 1:
    return lambda p: loss(p, batch)
  return aho.sub_batch_value_fn(loss, batch, chunks=chunks)


def every(batch, stride: int):
  """Every ``stride``-th row of the batch: ``batch.reshape(B / stride,
  stride, ...)[:, 0]``, spread over the devices of a leading-axis split as
  the batch is (when ``stride`` divides the rows per device)."""
  if stride == 1:
    return batch
  b = batch.shape[0]
  if b % stride:
    raise ValueError(f"--gnb-stride {stride} does not divide the batch of "
                     f"{b}")
  return batch.reshape((b // stride, stride) + batch.shape[1:])[:, 0]


# Sharding: FSDP over a one-axis mesh.

def make_mesh(devices: int):
  return jax.make_mesh((devices,), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:devices])


def fsdp_spec(shape, devices: int) -> jax.sharding.PartitionSpec:
  """A matrix's largest axis divisible by the device count; vectors and
  scalars replicated. A rule of the shape alone, so that optimizer state
  shaped like a param is sharded like it."""
  P = jax.sharding.PartitionSpec
  if len(shape) < 2 or devices == 1:
    return P()
  axes = [a for a in range(len(shape)) if shape[a] % devices == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda a: shape[a])
  return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])


def shardings(tree, mesh):
  """A :class:`NamedSharding` for every leaf of ``tree``, by its shape."""
  n = mesh.size
  return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh, fsdp_spec(x.shape, n)), tree)


def batch_sharding(mesh):
  return jax.sharding.NamedSharding(mesh,
                                    jax.sharding.PartitionSpec("fsdp"))


# Optimizers and their training steps.

@dataclasses.dataclass(frozen=True)
class Settings:
  """How an optimizer's step is run (all static)."""

  optimizer: str = "AdamW"
  lr: float = 1e-3
  weight_decay: float = 0.0
  hessian_interval: int = 1
  fused: bool = True
  chunks: int = 1
  gnb_stride: int = 1
  seed: int = 0
  steps: int = 100
  block_size: int = 32


def make_tx(s: Settings, rules=None):
  """The optimizer ``s.optimizer``: a linear warm-up, then cosine decay."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, s.lr, warmup_steps=max(1, s.steps // 10), decay_steps=s.steps)
  if s.optimizer == "AdamW":
    return optax.adamw(schedule, b1=0.9, b2=0.95,
                       weight_decay=s.weight_decay)
  if s.optimizer == "AdaHessian":
    # update_interval=None: the host decides each refresh. The study's
    # recommendation, each layer's update at most 0.1 RMS.
    return aho.adahessian(schedule, key=s.seed, weight_decay=s.weight_decay,
                          spatial_averaging=rules,
                          update_interval=interval(s),
                          rms_clip_threshold=0.1)
  if s.optimizer == "AdaHessian-GNB":
    # As examples/char_lm.py: the GNB estimate has no off-diagonal noise to
    # inflate it, so the update is clipped as Sophia's is.
    # With gnb_stride > 1 the optimizer refreshes in its own lax.cond
    # (update_interval=k, one program), as Sophia does.
    return aho.adahessian(schedule, estimator=aho.gnb_estimator(key=s.seed),
                          weight_decay=s.weight_decay,
                          spatial_averaging=rules,
                          update_interval=interval(s),
                          clip_threshold=0.1)
  if s.optimizer == "Sophia-G":
    return optax.contrib.sophia(
        schedule, weight_decay=s.weight_decay,
        update_interval=s.hessian_interval,
        hessian_diagonal_fn=aho.gnb_estimator(key=s.seed))
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got "
                   f"{s.optimizer!r}")


def interval(s: Settings):
  """AdaHessian's ``update_interval``: None when the host picks the fused
  step's refreshes, else the optimizer's own (in its ``lax.cond``)."""
  return None if s.fused else s.hessian_interval


def uses_refresh(s: Settings) -> bool:
  """Whether the host picks between a refresh program and a plain one."""
  return s.optimizer in ("AdaHessian", "AdaHessian-GNB") and s.fused


def train_step(cfg: GPTConfig, graphdef, tx, s: Settings, params, opt_state,
               batch, *, refresh: bool = True):
  """One step: ``(params, opt_state, loss)``. Pure; jit it.

  ``refresh`` (static) chooses AdaHessian's program: the fused refresh step
  or a plain gradient.
  """
  loss = functools.partial(loss_fn, graphdef=graphdef)
  if s.optimizer == "AdamW":
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
  elif s.optimizer == "Sophia-G":
    # Sophia refreshes inside its own lax.cond and takes the loss on every
    # step; the GNB estimate needs its gradient only, so it goes through a
    # custom-VJP kernel as it is.
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(
        grads, opt_state, params,
        obj_fn=ggn_loss(graphdef, every(batch, s.gnb_stride)))
  elif not s.fused:
    # The plain call: the gradient, then the estimate in the optimizer's own
    # lax.cond every s.hessian_interval steps (after the gradient: a branch
    # is not interleaved with it), on every s.gnb_stride-th example for GNB.
    value, grads = jax.value_and_grad(loss)(params, batch)
    value_fn = (ggn_loss(graphdef, every(batch, s.gnb_stride))
                if s.optimizer == "AdaHessian-GNB"
                else curvature_value_fn(cfg, graphdef, batch, s.chunks))
    updates, opt_state = tx.update(grads, opt_state, params,
                                   value_fn=value_fn)
  elif not refresh:
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   hessian_refresh=False)
  elif s.optimizer == "AdaHessian-GNB":
    # The fused step: one forward pass, the true and the sampled labels'
    # backward passes; through a kernel too.
    value, grads, hessian = aho.value_grad_and_hessian(
        ggn_loss(graphdef, batch), params, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params, hessian=hessian)
  elif cfg.attention in KERNELS:
    # The kernel has no forward-mode rule: the gradient through the kernel,
    # the Hessian-vector product through a closure with XLA attention (its
    # own gradient, a by-product, is dropped: one gradient more).
    value, grads = jax.value_and_grad(loss)(params, batch)
    _, _, hessian = aho.value_grad_and_hessian(
        curvature_value_fn(cfg, graphdef, batch, s.chunks), params, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params, hessian=hessian)
  else:
    # The fused step: loss, gradient and estimate from one pass (in chunks
    # with s.chunks > 1).
    value, grads, hessian = aho.value_grad_and_hessian(
        curvature_value_fn(cfg, graphdef, batch, s.chunks), params, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params, hessian=hessian)
  return optax.apply_updates(params, updates), opt_state, value


def check_settings(s: Settings) -> None:
  if s.optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got "
                     f"{s.optimizer!r}")
  if s.gnb_stride > 1 and s.optimizer == "AdaHessian-GNB" and s.fused:
    raise ValueError(
        "--gnb-stride takes the GNB estimate on part of the batch, which the "
        "fused step cannot (its gradient is the estimate's batch): add "
        "--plain")


# Data: bytes of standard-library source.

def load_bytes() -> np.ndarray:
  """The source of a few standard-library modules as byte ids (< 256)."""
  parts = []
  for name in MODULES:
    with open(inspect.getsourcefile(importlib.import_module(name)),
              "rb") as f:
      parts.append(f.read())
  return np.frombuffer(b"\n".join(parts), np.uint8).astype(np.int32)


def sample_batch(ids, batch_size, seq_len, rng) -> np.ndarray:
  """``batch_size`` windows of ``seq_len + 1`` bytes at random offsets."""
  starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
  return np.stack([ids[s:s + seq_len + 1] for s in starts])


# Training.

def place(tree, mesh):
  return jax.device_put(tree, shardings(tree, mesh))


def train(cfg, s: Settings, devices: int, data, args, progress=None):
  """Trains one optimizer on ``devices`` devices; returns its record and
  final params."""
  train_ids, val_batch = data
  mesh = make_mesh(devices)
  graphdef, params = build(cfg, seed=args.seed)
  tx = make_tx(s, spatial_rules(cfg))
  params = place(params, mesh)
  opt_state = place(tx.init(params), mesh)
  out = (shardings(params, mesh), shardings(opt_state, mesh),
         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  programs = {}

  def step_fn(refresh):
    if refresh not in programs:
      programs[refresh] = jax.jit(
          functools.partial(train_step, cfg, graphdef, tx, s,
                            refresh=refresh), out_shardings=out)
    return programs[refresh]

  val_loss = jax.jit(functools.partial(loss_fn, graphdef=graphdef))
  to_devices = lambda b: jax.device_put(b, batch_sharding(mesh))
  rng = np.random.default_rng(args.seed)  # the same batches for every run
  losses, seconds, timed = [], 0.0, 0
  with jax.set_mesh(mesh):
    val = [float(val_loss(params, to_devices(val_batch)))]
    for step in range(s.steps):
      batch = to_devices(sample_batch(train_ids, args.batch_size,
                                      args.seq_len, rng))
      refresh = not uses_refresh(s) or step % s.hessian_interval == 0
      start = time.perf_counter()
      params, opt_state, loss = step_fn(refresh)(params, opt_state, batch)
      losses.append(float(loss))
      if step >= 2 * s.hessian_interval:  # every program compiled by now
        seconds += time.perf_counter() - start
        timed += 1
      if progress:
        progress(s.optimizer, devices, step, losses[-1])
    val.append(float(val_loss(params, to_devices(val_batch))))
  record = {"optimizer": s.optimizer, "devices": devices, "lr": s.lr,
            "train_loss": losses, "val_loss": val,
            "ms_per_step": 1e3 * seconds / max(timed, 1),
            "finite": bool(np.all(np.isfinite(losses)))}
  return record, jax.device_get(params)


LEARNING_RATES = {"AdamW": 3e-3, "AdaHessian": 0.05, "AdaHessian-GNB": 0.01,
                  "Sophia-G": 1e-3}


def results_table(data) -> str:
  """Each run: the training loss at the first and the last step, the
  validation loss before and after, the time per step, and for a sharded
  run its largest difference from the first device count's run."""
  lines = ["| optimizer | lr | devices | training loss | validation loss "
           "| ms/step | against the first device count |",
           "|---|---|---|---|---|---|---|"]
  for r in data["runs"]:
    diff = (f"loss {r['max_loss_rel_diff']:.1e} (relative), params "
            f"{r['max_param_diff']:.1e}" if "max_param_diff" in r else "—")
    lines.append(
        f"| {r['optimizer']} | {r['lr']:g} | {r['devices']} "
        f"| {r['train_loss'][0]:.3f} → {r['train_loss'][-1]:.3f} "
        f"| {r['val_loss'][0]:.3f} → {r['val_loss'][-1]:.3f} "
        f"| {r['ms_per_step']:.1f} | {diff} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="mini", choices=list(CONFIGS))
  parser.add_argument("--vocab-size", type=int, default=None,
                      help="rows of the token embedding (>= 256); default "
                      "the configuration's")
  parser.add_argument("--seq-len", type=int, default=None,
                      help="default the configuration's context")
  parser.add_argument("--attention", default="xla", choices=ATTENTION)
  parser.add_argument("--flash-block", type=int, default=128)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--devices", type=int, nargs="+", default=[1])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=OPTIMIZERS)
  parser.add_argument("--steps", type=int, default=None,
                      help="default 300 (6 with --smoke)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="the global batch, split over the devices")
  parser.add_argument("--hessian-interval", type=int, default=2,
                      help="refresh the estimate every this many steps "
                      "(AdaHessian and Sophia-G)")
  parser.add_argument("--plain", action="store_true",
                      help="AdaHessian: the plain call, refreshing in the "
                      "optimizer's own lax.cond, instead of the fused step")
  parser.add_argument("--chunks", type=int, default=1,
                      help="AdaHessian: the Hessian-vector product in this "
                      "many strided pieces of the batch")
  parser.add_argument("--gnb-stride", type=int, default=1,
                      help="GNB: the estimate on every k-th example (with "
                      "--plain for AdaHessian-GNB)")
  for name, lr in LEARNING_RATES.items():
    parser.add_argument(f"--{name.lower()}-lr", type=float, default=lr)
  parser.add_argument("--weight-decay", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="results")
  parser.add_argument("--json", default=None,
                      help="also write the results to this file")
  parser.add_argument("--smoke", action="store_true",
                      help="the tiny configuration, a few steps")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if args.smoke:
    args.config = "tiny"
  if args.steps is None:
    args.steps = 6 if args.smoke else 300
  cfg = dataclasses.replace(
      CONFIGS[args.config], attention=args.attention, remat=args.remat,
      dtype=args.dtype, flash_block=args.flash_block,
      vocab_size=args.vocab_size or CONFIGS[args.config].vocab_size)
  if cfg.vocab_size < 256:
    raise ValueError(f"--vocab-size {cfg.vocab_size}: the text is bytes, "
                     "so at least 256")
  args.seq_len = args.seq_len or cfg.context
  check_attention(cfg)
  for n in args.devices:
    if n > jax.device_count():
      raise ValueError(
          f"--devices {n}: only {jax.device_count()} devices here; on a "
          "CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{n}")
    if args.batch_size % n:
      raise ValueError(f"--batch-size {args.batch_size} does not split "
                       f"over {n} devices")

  start = time.perf_counter()
  ids = load_bytes()
  split = int(0.9 * len(ids))
  val_batch = sample_batch(ids[split:], args.batch_size, args.seq_len,
                           np.random.default_rng(12345))
  n_params = param_count(build(cfg, abstract=True)[1])
  print(f"{args.config}: {n_params:,} parameters, {cfg.layers} layers, "
        f"width {cfg.width}, vocabulary {cfg.vocab_size}; attention "
        f"{cfg.attention}, {cfg.dtype} compute"
        f"{', remat' if cfg.remat else ''}; batch {args.batch_size} x "
        f"{args.seq_len} bytes, {args.steps} steps, devices {args.devices}")
  progress = None if args.no_progress else (
      lambda name, n, step, loss: print(
          f"  {name} on {n}: step {step + 1}/{args.steps} loss {loss:.4f}",
          end="\r", flush=True))
  records = []
  for name in args.optimizers:
    lr = getattr(args, name.lower().replace("-", "_") + "_lr")
    s = Settings(optimizer=name, lr=lr,
                 weight_decay=args.weight_decay,
                 hessian_interval=args.hessian_interval,
                 fused=not args.plain, chunks=args.chunks,
                 gnb_stride=args.gnb_stride, seed=args.seed,
                 steps=args.steps)
    check_settings(s)
    first = None
    for n in args.devices:
      record, params = train(cfg, s, n, (ids[:split], val_batch), args,
                             progress)
      if first is None:
        first = (record, params)
      else:
        record["max_param_diff"] = max(
            float(np.max(np.abs(a - b))) for a, b in
            zip(jax.tree.leaves(params), jax.tree.leaves(first[1])))
        record["max_loss_rel_diff"] = float(np.max(
            np.abs(np.subtract(record["train_loss"],
                               first[0]["train_loss"]))
            / np.abs(first[0]["train_loss"])))
      records.append(record)
  if progress:
    print()
  summary = {"config": args.config, "parameters": n_params,
             "settings": dict(vars(args)), "model": dataclasses.asdict(cfg),
             "backend": jax.default_backend(),
             "seconds": round(time.perf_counter() - start), "runs": records}
  print(results_table(summary))
  os.makedirs(args.out, exist_ok=True)
  paths = [os.path.join(args.out, "gpt_results.json")] + (
      [args.json] if args.json else [])
  for path in paths:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
      json.dump(summary, f, indent=1)
  print(f"wrote {', '.join(paths)} ({summary['seconds']} s in all)")
  bad = [r["optimizer"] for r in records if not r["finite"]]
  if bad:
    raise SystemExit(f"non-finite training loss for {bad}")


if __name__ == "__main__":
  main()
