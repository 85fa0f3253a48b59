"""The study's optimizers and AdaHessian variants.

An :class:`Opt` is a hashable configuration: its family, its options and
its learning-rate grid (half-decade exponents, ``10 ** (e / 2)``).
``make(task, schedule, seed)`` builds it as an optax transformation whose
seed-dependent parts live in its state.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adahessian_optax as aho
from adahessian_optax.optimizer import _spatial as aho_spatial
from benchmarks.study import sgd_sai
from benchmarks.study import tasks as study_tasks


def _shampoo_module():
  """precondition-opt's Distributed Shampoo, with JAX's removed aliases.

  precondition-opt 0.3.0 (Google's, the last release) still calls
  ``jax.tree_map``, ``jax.tree_flatten`` and ``jax.tree_unflatten``, removed
  from JAX; they are restored here, in the study's process only, as the
  ``jax.tree`` functions they were aliases of.
  """
  for name in ("tree_map", "tree_flatten", "tree_unflatten"):
    if not hasattr(jax, name):
      setattr(jax, name, getattr(jax.tree, name.removeprefix("tree_")))
  from precondition import distributed_shampoo  # pylint: disable=import-outside-toplevel
  return distributed_shampoo


def _shampoo(schedule):
  ds = _shampoo_module()
  return ds.distributed_shampoo(
      schedule, block_size=128, beta1=0.9, beta2=0.999,
      graft_type=ds.GraftingType.RMSPROP_NORMALIZED, nesterov=False,
      # Inverse roots every 10 steps (every step was 20x Adam's step here).
      preconditioning_compute_steps=10, generate_training_metrics=False)


@dataclasses.dataclass(frozen=True)
class Opt:
  """An optimizer configuration of the study.

  Attributes:
    label: its name in the tables (unique).
    family: ``"adahessian"``, ``"adam"``, ``"adamw"``, ``"sgdm"``,
      ``"sophia"`` (Sophia-H), ``"sophia_g"`` (Sophia-G), ``"adan"``,
      ``"sgd_sai"`` or ``"shampoo"``.
    grid: the first and last exponent ``e`` of the tuning grid
      ``10 ** (e / 2)`` (extended while the best is at an edge).
    options: AdaHessian's options as sorted ``(name, value)`` pairs: ``k``
      (Hessian every k steps), ``eps``, ``power``, ``n_samples``,
      ``distribution``, ``block``, ``sub_batch`` (fraction), ``clip``;
      ``curvature`` (``"gnb"``: the Gauss-Newton-Bartlett estimator),
      ``floor`` (the averaged ``|D|`` floored at this fraction of its
      leaf's mean), ``layer_mean`` (``|D|`` averaged over each whole leaf),
      ``layer_rms`` (each leaf's preconditioned update clipped to this RMS),
      ``warmup`` (the fraction of steps of linear warmup; the task's own by
      default).
  """

  label: str
  family: str
  grid: tuple[int, int]
  options: tuple = ()

  def option(self, name: str, default: Any = None) -> Any:
    return dict(self.options).get(name, default)

  @property
  def needs_value_fn(self) -> bool:
    return self.family in ("adahessian", "sophia", "sophia_g")

  @property
  def uses_ggn(self) -> bool:
    """Whether the loss goes in as an ``aho.ggn`` (for the GNB estimator)."""
    return self.family == "sophia_g" or self.option("curvature") == "gnb"

  @property
  def refresh_every(self) -> int:
    return self.option("k", 1)

  def value_fn(self, task, batch):
    """The loss closure of one batch (a sub-batch Hessian or a GGN if
    asked)."""
    if self.uses_ggn:
      return task.ggn(batch)
    fraction = self.option("sub_batch")
    if fraction is not None:
      return aho.sub_batch_value_fn(task.loss, batch, fraction)
    return functools.partial(task.loss, batch=batch)

  def make(self, task, schedule, seed: int) -> optax.GradientTransformation:
    decay = 1.0 if task.weight_decay else 0.0
    return optax.chain(_FACTORIES[self.family](self, task, schedule, seed,
                                               decay))


def _adahessian(opt: Opt, task, schedule, seed: int, decay: float):
  """`aho.adahessian` as its chain, with an optional elementwise clip.

  With ``clip=None`` this is exactly ``aho.adahessian(schedule,
  weight_decay=5e-4 * decay, ...)``.
  """
  k = opt.refresh_every
  # The CNN's trainer picks one of two compiled steps on the host.
  interval = None if k > 1 and isinstance(task, study_tasks.CNN) else k
  clip, layer_rms = opt.option("clip"), opt.option("layer_rms")
  estimator = (dict(estimator=aho.gnb_estimator(key=seed))
               if opt.option("curvature") == "gnb" else
               dict(key=seed, n_samples=opt.option("n_samples"),
                    distribution=opt.option("distribution")))
  return optax.chain(
      aho.scale_by_adahessian(
          eps=opt.option("eps", 1e-4), hessian_power=opt.option("power", 1.0),
          update_interval=interval, spatial_averaging=_spatial(opt, task),
          **estimator),
      *([optax.clip(clip)] if clip is not None else []),
      *([optax.clip_by_block_rms(layer_rms)] if layer_rms is not None
        else []),
      optax.add_decayed_weights(5e-4 * decay),
      optax.scale_by_learning_rate(schedule))


@dataclasses.dataclass(frozen=True)
class FloorRule(aho.SpatialRule):
  """A leaf's rule, then a floor at `fraction` of the leaf's mean |D|."""

  base: Any
  fraction: float

  def apply(self, x):
    y = x if self.base is None else self.base.apply(x)
    return jnp.maximum(y, self.fraction * jnp.mean(x))


def _spatial(opt: Opt, task):
  """The task's averaging, or a remedy's rule on every leaf."""
  base = task.spatial(opt.option("block"))
  if opt.option("layer_mean"):
    return lambda params: jax.tree.map(
        lambda leaf: aho.mean_over_axes(*range(leaf.ndim)), params)
  fraction = opt.option("floor")
  if fraction is None:
    return base

  def floored(params):
    rules = aho_spatial.resolve_rules(base, params)
    return jax.tree.unflatten(jax.tree.structure(params),
                              [FloorRule(r, fraction) for r in rules])
  return floored


_FACTORIES = {
    "adahessian": _adahessian,
    "adam": lambda o, t, lr, seed, decay: optax.adam(lr),
    "adamw": lambda o, t, lr, seed, decay: optax.adamw(
        lr, weight_decay=1e-2 * decay),
    "sgdm": lambda o, t, lr, seed, decay: optax.sgd(lr, momentum=0.9),
    # A fresh probe key per seed: optax's default estimator has a fixed one.
    "sophia": lambda o, t, lr, seed, decay: optax.contrib.sophia(
        lr, weight_decay=1e-4 * decay,
        hessian_diagonal_fn=aho.hutchinson_estimator(key=seed)),
    # Sophia-G as its paper and optax define it, the GNB estimate every 10
    # steps inside Sophia's own lax.cond.
    "sophia_g": lambda o, t, lr, seed, decay: optax.contrib.sophia(
        lr, weight_decay=1e-4 * decay,
        hessian_diagonal_fn=aho.gnb_estimator(key=seed)),
    "adan": lambda o, t, lr, seed, decay: optax.adan(
        lr, weight_decay=2e-2 * decay),
    "sgd_sai": lambda o, t, lr, seed, decay: sgd_sai.sgd_sai(
        lr, weight_decay=1e-2 * decay),
    "shampoo": lambda o, t, lr, seed, decay: _shampoo(lr),
}

ADAHESSIAN = Opt("AdaHessian", "adahessian", (-4, 1))
_ADAPTIVE, _SGD = (-8, -2), (-6, 0)


def baselines(task, quick: bool = False) -> list[Opt]:
  """AdaHessian and the optimizers users would pick instead.

  Shampoo runs on the quadratics and the MLP only: its step took about 30x
  Adam's on the MLP here (inverse matrix roots on CPU), too slow for the
  CNN's and the LM's budget.
  """
  if quick:
    return [ADAHESSIAN, Opt("Adam", "adam", _ADAPTIVE)]
  out = [ADAHESSIAN,
         Opt("Adam", "adam", _ADAPTIVE),
         Opt("AdamW", "adamw", _ADAPTIVE),
         Opt("SGD+momentum", "sgdm", _SGD),
         Opt("Sophia-H", "sophia", _ADAPTIVE),
         Opt("Adan", "adan", _ADAPTIVE),
         Opt("SGD-SaI", "sgd_sai", _SGD)]
  if isinstance(task, (study_tasks.Quadratic, study_tasks.DigitsMLP)):
    out.append(Opt("Shampoo", "shampoo", _ADAPTIVE))
  return out


def remedies(quick: bool = False) -> list[Opt]:
  """Variants that bound AdaHessian's step where curvature is low."""
  grid = (-4, 0)
  clip = Opt("AdaHessian clip 0.1", "adahessian", grid, (("clip", 0.1),))
  if quick:
    return [clip]
  return [clip,
          Opt("AdaHessian power 0.5", "adahessian", grid, (("power", 0.5),)),
          Opt("AdaHessian eps 1e-2", "adahessian", grid, (("eps", 1e-2),))]


SOPHIA_G = Opt("Sophia-G", "sophia_g", _ADAPTIVE)
ADAHESSIAN_GNB = Opt("AdaHessian-GNB", "adahessian", ADAHESSIAN.grid,
                     (("curvature", "gnb"),))


def second_round(quick: bool = False) -> tuple[list[Opt], list[Opt]]:
  """The second round's optimizers (full protocol) and remedies (light).

  The remedies bound AdaHessian's step without relying on probe noise: a
  floor on the averaged |D| at a tenth of its leaf's mean, |D| averaged over
  each whole leaf (the largest averaging block), each leaf's update clipped
  to an RMS of 0.1, a four times longer warmup; and the GNB estimate with
  the elementwise clip that `examples/char_lm.py` needed.
  """
  grid = (-4, 0)
  def remedy(label, **options):
    return Opt(label, "adahessian", grid, tuple(sorted(options.items())))
  floor = remedy("AdaHessian floor 0.1", floor=0.1)
  if quick:
    return [SOPHIA_G, ADAHESSIAN_GNB], [floor]
  return [SOPHIA_G, ADAHESSIAN_GNB], [
      floor,
      remedy("AdaHessian layer mean", layer_mean=True),
      remedy("AdaHessian layer RMS 0.1", layer_rms=0.1),
      remedy("AdaHessian warmup 20%", warmup=0.2),
      remedy("AdaHessian-GNB clip 0.1", curvature="gnb", clip=0.1)]


def large_lm(quick: bool = False) -> list[Opt]:
  """The harder LM's optimizers, each on a three-point grid around the
  small LM's tuned rate (extended while the best is at an edge): AdamW,
  AdaHessian, Sophia-G, AdaHessian-GNB and the two remedies that held on
  the first four tasks."""
  def near(opt, lo):
    return dataclasses.replace(opt, grid=(lo, lo + 2))
  adamw = Opt("AdamW", "adamw", _ADAPTIVE)
  if quick:
    return [near(ADAHESSIAN, -3), near(adamw, -5)]
  remedies = {o.label: o for o in second_round()[1]}
  return [near(ADAHESSIAN, -3), near(adamw, -5), near(SOPHIA_G, -7),
          near(ADAHESSIAN_GNB, -3),
          near(remedies["AdaHessian layer RMS 0.1"], -3),
          near(remedies["AdaHessian-GNB clip 0.1"], -3)]


def ablations(task, quick: bool = False) -> list[Opt]:
  """AdaHessian's options, each run at AdaHessian's tuned rate."""
  def variant(label, **options):
    return Opt(label, "adahessian", ADAHESSIAN.grid,
               tuple(sorted(options.items())))
  if quick:
    return [variant("k=2", k=2)]
  out = [variant(f"k={k}", k=k) for k in (2, 3, 4, 5)]
  # A stale single-probe estimate early in training: bounded by the clip?
  out.append(variant("k=4, clip 0.1", k=4, clip=0.1))
  out += [variant(f"{n} probes", n_samples=n) for n in (2, 4)]
  out.append(variant("Gaussian probes", distribution="gaussian"))
  out += [variant(f"block {b}", block=b) for b in task_blocks(task)]
  if not isinstance(task, study_tasks.CNN):  # BatchNorm: see docs/study.md
    out += [variant(f"sub-batch {f:g}", sub_batch=f) for f in (0.5, 0.25)]
  return out


def task_blocks(task) -> tuple[int, ...]:
  """Block sizes tried on the task's dense and attention kernels."""
  return {"MLP": (4, 16, 64), "char LM": (1, 8, 64)}.get(task.name, ())
