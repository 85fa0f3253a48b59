"""The study's tasks: two quadratics, an MLP, the digits CNN and the char LM.

Each task trains one optimizer configuration at one learning rate and seed
on the ``"val"`` split (tuning: training data held out from the training
set) or the ``"test"`` split (the reported numbers), and returns the run's
curves. The CNN is the main job's (``examples/digits.py``), the LM the
example's (``examples/char_lm.py``), imported, not copied.

Everything that depends on the seed (initialization, batch order, probe
keys) is an array, so each optimizer configuration compiles once per task
and split; the learning rate is an argument of the compiled step (every
optimizer here ends with ``scale_by_learning_rate``, so scaling its updates
by the peak rate is the optimizer at that rate).
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_optax as aho
from benchmarks.common import models
from examples import char_lm
from examples import digits


diverged = digits.diverged  # the main job's rule, for every task


@dataclasses.dataclass(frozen=True)
class Functional:
  """A task on a plain pytree of params, trained in jitted `lax.scan` chunks.

  Attributes:
    name: the task's name in the tables.
    metric: the reported test metric's name.
    higher_is_better: whether a larger metric is better.
    chunks: evaluations per run (one per chunk of steps).
    weight_decay: whether the optimizers' weight decay applies.
  """

  name: str
  metric: str
  higher_is_better: bool
  chunks: int
  weight_decay: bool = True

  default_block = None

  def spatial(self, block: Optional[int]):
    """AdaHessian's spatial averaging with blocks of `block` entries.

    ``None`` is the task's default; 1 (or a task without block rules) is
    no averaging: these tasks' params are plain pytrees of dense kernels and
    biases (0.2's default, ``conv_window_mean``, left them as they are too).
    """
    block = self.default_block if block is None else block
    if block in (None, 1):
      return None
    return self.block_rules(block)

  def block_rules(self, block: int):
    raise ValueError(f"{self.name} has no block rules (block {block})")


class Quadratic(Functional):
  """Least squares with features scaled over three decades, noise-free.

  The Hessian is ``diag(s^2)`` (axis-aligned: a diagonal preconditioner
  undoes the scaling) or ``R^T diag(s^2) R`` for a random rotation ``R``
  (its diagonal is nearly constant and says nothing). The metric is the
  log10 of the test loss.
  """

  dim, batch, sizes = 50, 64, {"train": 2048, "val": 1024, "test": 1024}

  def __init__(self, name: str, rotated: bool, quick: bool):
    super().__init__(name, "log10 test loss", False, 5 if quick else 25,
                     weight_decay=False)
    object.__setattr__(self, "rotated", rotated)

  @functools.cached_property
  def data(self):
    rng = np.random.default_rng(1234)
    scales = 10.0 ** np.linspace(-1.5, 1.5, self.dim)
    rotation = (np.linalg.qr(rng.normal(size=(self.dim, self.dim)))[0]
                if self.rotated else np.eye(self.dim))
    w_star = rotation.T @ (rng.normal(size=self.dim) / np.sqrt(self.dim)
                           / scales)
    def sample(n):
      x = (rng.normal(size=(n, self.dim)) * scales) @ rotation
      return (x.astype(np.float32), (x @ w_star).astype(np.float32))
    return {split: sample(n) for split, n in self.sizes.items()}

  def init(self, seed: int):
    del seed
    return {"w": jnp.zeros(self.dim)}

  def loss(self, params, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ params["w"] - y) ** 2)

  def ggn(self, batch):
    x, y = batch
    return aho.ggn(lambda params: x @ params["w"], aho.SquaredError(y))

  def batches(self, seed: int, split: str):
    del split  # one training set; tuning scores on val, reports on test
    x, y = self.data["train"]
    return _epochs(x, y, self.batch, self.chunks, seed)

  def evaluate(self, params, split: str):
    loss = float(self.loss(params, self.data[split]))
    return loss, float(np.log10(loss)) if loss > 0 else float("-inf")


def _epochs(x, y, batch: int, epochs: int, seed: int):
  """`(x, y)` as [epochs, steps, batch, ...], reshuffled every epoch."""
  rng = np.random.default_rng(seed)
  steps = len(x) // batch
  order = np.stack([rng.permutation(len(x))[:steps * batch]
                    for _ in range(epochs)]).reshape(epochs, steps, batch)
  return x[order], y[order]


class DigitsMLP(Functional):
  """A 64-128-128-10 ReLU MLP on the flattened digits (no BatchNorm)."""

  def __init__(self, quick: bool):
    super().__init__("MLP", "test acc %", True, 2 if quick else 20)

  @functools.cached_property
  def data(self):
    out = {}
    for split in ("val", "test"):
      x_train, y_train, x_eval, y_eval = digits.load_data(
          0, False, validation=split == "val")
      out[split] = (x_train.reshape(len(x_train), -1), y_train,
                    x_eval.reshape(len(x_eval), -1), y_eval)
    return out

  def init(self, seed: int):
    sizes = (64, 128, 128, 10)
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    return {f"dense{i}": {
        "kernel": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m),
        "bias": jnp.zeros(n)} for i, (k, m, n) in enumerate(
            zip(keys, sizes[:-1], sizes[1:]))}

  def logits(self, params, x):
    return models.mlp_logits(params, x, jax.nn.relu)

  def loss(self, params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        self.logits(params, x), y).mean()

  def ggn(self, batch):
    x, y = batch
    return aho.ggn(lambda params: self.logits(params, x),
                   aho.SoftmaxCrossEntropy(y))

  def batches(self, seed: int, split: str):
    x, y = self.data[split][:2]
    return _epochs(x, y, 64, self.chunks, seed)

  def evaluate(self, params, split: str):
    x, y = self.data[split][2:]
    loss = float(self.loss(params, (x, y)))
    acc = float(jnp.mean(jnp.argmax(self.logits(params, x), -1) == y))
    return loss, 100 * acc

  def block_rules(self, block: int):
    """`block_mean(block)` on the kernels whose last axis can hold it."""
    return {name: {"kernel": aho.block_mean(block)
                   if layer["kernel"].shape[-1] >= block else None,
                   "bias": None}
            for name, layer in self.init(0).items()}


class CharLM(Functional):
  """The example's character-level Transformer, smaller: 2 layers of 32."""

  context, batch, width, heads, layers = 32, 16, 32, 1, 2

  def __init__(self, quick: bool, name: str = "char LM", chunks: int = 8,
               chunk_steps: int = 50):
    super().__init__(name, "test loss", False, 1 if quick else chunks)
    object.__setattr__(self, "chunk_steps", 5 if quick else chunk_steps)

  @functools.cached_property
  def data(self):
    ids, vocab = char_lm.load_text()
    cut1, cut2 = int(0.8 * len(ids)), int(0.9 * len(ids))
    rng = np.random.default_rng(12345)
    held_out = {split: jnp.asarray(np.stack([char_lm.batches(
        part, self.batch, self.context, rng) for _ in range(16)]))
                for split, part in (("val", ids[cut1:cut2]),
                                    ("test", ids[cut2:]))}
    model = char_lm.CharTransformer(
        vocab=len(vocab), width=self.width, heads=self.heads,
        layers=self.layers, context=self.context)
    return ids[:cut1], held_out, model

  def init(self, seed: int):
    model = self.data[2]
    return model.init(jax.random.key(seed),
                      jnp.zeros((1, self.context), jnp.int32))["params"]

  def loss(self, params, batch):
    return char_lm.loss_fn(params, self.data[2].apply, batch)

  def ggn(self, batch):
    return char_lm.ggn_loss(None, self.data[2].apply, batch)

  def batches(self, seed: int, split: str):
    del split  # the same training text; val and test differ in evaluation
    rng = np.random.default_rng(seed)
    ids = self.data[0]
    return (np.stack([char_lm.batches(ids, self.batch, self.context, rng)
                      for _ in range(self.chunks * self.chunk_steps)]
                     ).reshape(self.chunks, self.chunk_steps, self.batch, -1),)

  @functools.cached_property
  def _held_out_loss(self):
    return jax.jit(lambda params, batches: jnp.mean(jax.vmap(
        lambda b: self.loss(params, b))(batches)))

  def evaluate(self, params, split: str):
    loss = float(self._held_out_loss(params, self.data[1][split]))
    return loss, loss

  default_block = 32  # the example's and the paper's for Transformers

  def block_rules(self, block: int):
    return functools.partial(char_lm.spatial_rules, block=block)


class LargeCharLM(CharLM):
  """The second round's harder LM: 4 layers of width 64, context 64.

  Scaled down from 4 layers of 128 with context 128 (0.40 s per AdaHessian
  step on the 2-core machine, 13 minutes a run) so that the second round
  fits its 2 hours: 2,000 steps of 8 x 64 characters (about 3.6 passes over
  the training text), about 1 minute a run for AdaHessian.
  """

  context, batch, width, heads, layers = 64, 8, 64, 2, 4

  def __init__(self, quick: bool):
    super().__init__(quick, "char LM, 4 layers", chunks=10, chunk_steps=200)


@functools.lru_cache(maxsize=None)
def _chunk_program(task: Functional, opt, steps: int):
  """`(params, opt_state, chunk, lr) -> (params, opt_state, losses)`.

  Traced with the seed-0 optimizer: its seed lives in the state.
  """
  tx = opt.make(task, _unit_schedule(steps, opt), 0)

  def step(carry, batch):
    params, state, lr = carry
    batch = batch if len(batch) > 1 else batch[0]
    value_fn = opt.value_fn(task, batch)
    loss, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    params = optax.apply_updates(params, optax.tree.scale(lr, updates))
    return (params, state, lr), loss

  @jax.jit
  def chunk(params, state, batches, lr):
    (params, state, _), losses = jax.lax.scan(step, (params, state, lr),
                                              batches)
    return params, state, losses

  return chunk


def _unit_schedule(steps: int, opt) -> optax.Schedule:
  """Linear warmup (5% of the steps, or the remedy's) then cosine to 0."""
  fraction = opt.option("warmup")
  warmup = steps // 20 if fraction is None else int(fraction * steps)
  return optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup_steps=max(1, warmup), decay_steps=steps)


def run_functional(task: Functional, opt, lr: float, seed: int,
                   split: str) -> dict:
  """Trains `opt` at peak rate `lr`; the curves and final numbers."""
  batches = task.batches(seed, split)
  steps = batches[0].shape[0] * batches[0].shape[1]
  program = _chunk_program(task, opt, steps)
  params = task.init(seed)
  state = opt.make(task, _unit_schedule(steps, opt), seed).init(params)
  train_loss, eval_loss, metric = [], [], []
  for i in range(batches[0].shape[0]):
    params, state, losses = program(params, state,
                                    tuple(b[i] for b in batches),
                                    jnp.float32(lr))
    train_loss.extend(np.asarray(losses).tolist())
    loss, value = task.evaluate(params, split)
    eval_loss.append(loss)
    metric.append(value)
  per_chunk = len(train_loss) // len(eval_loss)
  final = float(np.mean(train_loss[-per_chunk:]))
  return {"train_loss": train_loss, "eval_loss": eval_loss, "metric": metric,
          "final_train_loss": final,
          "diverged": diverged(train_loss, final)}


@dataclasses.dataclass(frozen=True)
class CNN:
  """The main job's digits CNN (BatchNorm, Dropout), through its `train`."""

  quick: bool
  name: str = "digits CNN"
  metric: str = "test acc %"
  higher_is_better: bool = True
  weight_decay: bool = True

  @property
  def epochs(self) -> int:
    return 1 if self.quick else digits.EPOCHS

  @functools.cached_property
  def data(self):
    return {split: digits.load_data(0, self.quick, validation=split == "val")
            for split in ("val", "test")}

  def spatial(self, block: Optional[int]):
    del block
    return digits.cnn_rules()

  def spec(self, opt) -> digits.Spec:
    return _cnn_spec(self, opt)


@functools.lru_cache(maxsize=None)
def _cnn_spec(task: CNN, opt) -> digits.Spec:
  """One `digits.Spec` per configuration, so its compiled steps are reused."""
  return digits.Spec(opt.label, 0.0,
                     lambda schedule, seed: opt.make(task, schedule, seed),
                     needs_value_fn=opt.needs_value_fn,
                     refresh_every=opt.refresh_every, ggn=opt.uses_ggn,
                     warmup=opt.option("warmup"))


def run_cnn(task: CNN, opt, lr: float, seed: int, split: str) -> dict:
  r = digits.train(task.spec(opt), task.data[split], learning_rate=lr,
                   epochs=task.epochs, batch_size=32 if task.quick else 64,
                   seed=seed, progress=False)
  return {"train_loss": r["train_loss"], "eval_loss": r["test_loss"],
          "metric": [100 * a for a in r["test_acc"]],
          "final_train_loss": r["final_train_loss"],
          "diverged": r["diverged"]}


def run(task, opt, lr: float, seed: int, split: str) -> dict:
  """One training run of `opt` on `task` (see the module docstring), with
  the chance level of its metric where it has one (accuracy, %)."""
  runner = run_cnn if isinstance(task, CNN) else run_functional
  result = runner(task, opt, lr, seed, split)
  result["chance"] = 10.0 if task.metric == "test acc %" else None
  return result


def tasks(quick: bool) -> dict[str, Any]:
  """The study's tasks by part."""
  quadratics = [Quadratic("quadratic, axis-aligned", False, quick),
                Quadratic("quadratic, rotated", True, quick)]
  return {
      "small": quadratics[1:] + [DigitsMLP(quick)] if quick
               else quadratics + [DigitsMLP(quick)],
      "cnn": [CNN(quick)],
      "lm": [CharLM(quick)],
      "lm-large": [LargeCharLM(quick)],
  }

