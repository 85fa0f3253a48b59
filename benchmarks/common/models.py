"""The benchmarks' models, in JAX and (for the PyTorch peers) in torch.

Two families, for two needs:

* the speed suite's (``benchmarks/speed``): an MLP (0.93M parameters, its
  cost in matrix products), a small CNN (its cost in convolutions) and a
  small Transformer (matrix products, softmax and LayerNorm) in Flax, each
  with a synthetic classification batch (:func:`make_problems`); their torch
  twins (:func:`torch_models`) have the same architectures and parameter
  counts;
* the exact-Hessian networks of the analysis benchmark
  (``benchmarks/analysis``): a tanh MLP 64-32-10 and a CNN with two 3x3
  convolutions, a few thousand parameters so that ``jax.hessian`` is
  affordable, as plain functions of a dict of arrays
  (:func:`small_params`, :func:`small_apply`) with a torch mirror holding the
  same weights (:func:`small_torch`). The study's MLP task applies its
  layers with the same :func:`mlp_logits`.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

MODELS = ("mlp", "cnn", "transformer")


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
  """A model, its parameters and one batch, with the loss of the benchmarks."""

  name: str
  module: nn.Module
  inputs: np.ndarray
  labels: np.ndarray
  params: Any = None

  @property
  def batch(self):
    return jnp.asarray(self.inputs), jnp.asarray(self.labels)

  def loss(self, params, batch):
    x, y = batch
    logits = self.module.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_problems(names, quick=False):
  """The problems named, with batches of the benchmark's size (or tiny)."""
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
      b = 4 if quick else 16
      m = Transformer()
      x = rng.integers(0, m.vocab, size=(b, m.seq)).astype(np.int32)
      y = rng.integers(0, m.vocab, size=(b, m.seq)).astype(np.int32)
      p = Problem("transformer", m, x, y)
    else:
      raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    p.params = p.module.init(jax.random.key(0), jnp.asarray(x))
    out.append(p)
  return out


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def torch_models():
  """The torch twins of the Flax models, by name (imports torch)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn as tnn  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

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
      mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
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


# --------------------------------------------------------------------------
# Small networks for an exact Hessian (the analysis benchmark).


def mlp_logits(params: dict, x, activation=jnp.tanh):
  """Dense layers ``{name: {"kernel", "bias"}}`` in order, `activation`
  between them (not after the last)."""
  *hidden, last = params.values()
  for layer in hidden:
    x = activation(x @ layer["kernel"] + layer["bias"])
  return x @ last["kernel"] + last["bias"]


def small_params(name: str, rng: np.random.Generator) -> dict:
  """The float32 weights of ``"mlp"`` or ``"cnn"``, drawn from `rng`."""
  def dense(n_in, n_out):
    return rng.normal(size=(n_in, n_out)) / np.sqrt(n_in), np.zeros(n_out)

  def conv(c_in, c_out):
    return (rng.normal(size=(3, 3, c_in, c_out)) / np.sqrt(9 * c_in),
            np.zeros(c_out))

  if name == "mlp":
    layers = {"dense1": dense(64, 32), "dense2": dense(32, 10)}
  else:
    layers = {"conv1": conv(1, 8), "conv2": conv(8, 16),
              "dense": dense(64, 10)}
  return {k: {"kernel": np.float32(w), "bias": np.float32(b)}
          for k, (w, b) in layers.items()}


def _conv(x, p):
  y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["bias"]


def _pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def small_apply(name: str, params: dict, x):
  """Logits of 8x8x1 images (NHWC) under the network `name`."""
  if name == "mlp":
    return mlp_logits(params, x.reshape(x.shape[0], -1))
  h = _pool(jnp.tanh(_conv(x, params["conv1"])))
  h = _pool(jnp.tanh(_conv(h, params["conv2"])))
  return mlp_logits({"dense": params["dense"]}, h.reshape(x.shape[0], -1))


def small_torch(name: str, params: dict):
  """The same network in torch, with the same weights (NHWC order kept)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn as tnn  # pylint: disable=import-outside-toplevel

  def linear(p):
    layer = tnn.Linear(*p["kernel"].shape)
    layer.weight.data = torch.tensor(np.asarray(p["kernel"]).T.copy())
    layer.bias.data = torch.tensor(np.asarray(p["bias"]))
    return layer

  def conv(p):
    layer = tnn.Conv2d(p["kernel"].shape[2], p["kernel"].shape[3], 3,
                       padding=1)
    layer.weight.data = torch.tensor(
        np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
    layer.bias.data = torch.tensor(np.asarray(p["bias"]))
    return layer

  class Net(tnn.Module):

    def __init__(self):
      super().__init__()
      if name == "mlp":
        self.layers = tnn.ModuleList([linear(params["dense1"]),
                                      linear(params["dense2"])])
      else:
        self.layers = tnn.ModuleList([conv(params["conv1"]),
                                      conv(params["conv2"]),
                                      linear(params["dense"])])

    def forward(self, x):  # x: NHWC
      if name == "mlp":
        return self.layers[1](torch.tanh(self.layers[0](x.flatten(1))))
      h = x.permute(0, 3, 1, 2)
      for layer in self.layers[:2]:
        h = tnn.functional.avg_pool2d(torch.tanh(layer(h)), 2)
      return self.layers[2](h.permute(0, 2, 3, 1).flatten(1))

  return Net()
