"""Argument checks shared by the public constructors."""

import numbers
from typing import Any

import jax
import numpy as np


def concrete_number(value: Any) -> float | None:
  """Returns `value` as a Python number, or None when it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Number):
    return value
  array = np.asarray(value)
  if array.shape != ():
    raise ValueError(f"expected a scalar, got an array of shape {array.shape}")
  return array.item()


def check_interval(name: str, value: Any, low: float, high: float, *,
                   low_open: bool = False, high_open: bool = False) -> None:
  """Raises ValueError when a concrete `value` lies outside [low, high]."""
  try:
    number = concrete_number(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a scalar number, got {value!r}") from e
  if number is None:
    return
  if isinstance(number, bool) or not isinstance(number, numbers.Real):
    raise TypeError(f"{name} must be a real scalar number, got {value!r}")
  if not np.isfinite(number):
    raise ValueError(f"{name} must be finite, got {number}")
  below = number <= low if low_open else number < low
  above = number >= high if high_open else number > high
  if below or above:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {number}")


def check_decay_precision(name: str, value: Any) -> None:
  """Raises when a decay rate is an array of a dtype narrower than float32.

  optax.inject_hyperparams stores hyperparameters in the params' dtype by
  default, and in bfloat16 or float16 a decay such as 0.999 rounds to 1.0.
  """
  dtype = getattr(value, "dtype", None)
  if (dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating)
      and jax.numpy.finfo(dtype).bits < 32):
    raise TypeError(
        f"{name} is a {np.dtype(dtype).name} array; decay rates need at least "
        "float32 (0.999 rounds to 1.0 in bfloat16). With "
        "optax.inject_hyperparams and low-precision params, pass "
        "hyperparam_dtype=jnp.float32.")


def check_positive_int(name: str, value: Any, *, allow_traced: bool) -> None:
  """Raises when a concrete `value` is not an integer >= 1."""
  if isinstance(value, jax.core.Tracer):
    if allow_traced:
      return
    raise TypeError(
        f"{name} must be a Python int because it fixes array shapes; it was "
        "traced. With optax.inject_hyperparams, pass "
        f"static_args=({name!r},).")
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
      raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    value = int(value)
  if not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value}")


def check_float_dtype(name: str, dtype: Any) -> None:
  """Raises unless `dtype` is None or names a real floating-point dtype."""
  if dtype is None:
    return
  try:
    canonical = np.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{name} must be a floating-point dtype, got {dtype!r}") from e
  if not jax.numpy.issubdtype(canonical, jax.numpy.floating):
    raise TypeError(f"{name} must be a floating-point dtype, got {canonical}")


def check_params(owner: str, params: Any) -> None:
  if params is None:
    raise ValueError(f"{owner} needs params, got None")


def check_value_fn(value_fn: Any, obj_fn: Any, owner: str):
  """Returns the loss closure given as `value_fn` or `obj_fn`."""
  if value_fn is not None and obj_fn is not None and value_fn is not obj_fn:
    raise ValueError(
        f"{owner} got both value_fn and obj_fn; they name the same loss "
        "closure, pass only one.")
  fn = value_fn if value_fn is not None else obj_fn
  if fn is None:
    where = (" (or obj_fn=...) as a keyword argument of update()"
             if owner.endswith(".update") else "")
    raise ValueError(
        f"{owner} needs the loss closure: pass value_fn=<params -> scalar "
        f"loss>{where}.")
  if not callable(fn):
    raise TypeError(
        f"{owner}: value_fn must be a callable params -> scalar loss, got "
        f"{type(fn).__name__}")
  return fn


def _is_masked(x: Any) -> bool:
  import optax  # pylint: disable=import-outside-toplevel
  return isinstance(x, optax.MaskedNode)


def has_masked_node(tree: Any) -> bool:
  """True when `tree` contains an `optax.MaskedNode` anywhere."""
  return any(_is_masked(x) for x in jax.tree.leaves(tree, is_leaf=_is_masked))


def call_value_fn(value_fn: Any, params: Any, *batch: Any) -> Any:
  """`value_fn(params, *batch)`, explaining failures on a masked params tree."""
  if not has_masked_node(params):
    return value_fn(params, *batch)
  try:
    return value_fn(params, *batch)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise TypeError(
        "value_fn failed on params that contain optax.MaskedNode: AdaHessian "
        "runs inside optax.masked or optax.partition, which hide the leaves it "
        "does not own, so the loss closure gets a partial tree. Pass "
        "value_fn=adahessian_optax.masked_value_fn(loss, params) (with the "
        "full params of the training step) to fill the hidden leaves. "
        f"The closure raised {type(e).__name__}: {e}") from e


def find_one(tree: Any, kind: type, what: str, hint: str) -> Any:
  """The one node of type `kind` in `tree`, or a ValueError naming `what`."""
  is_kind = lambda x: isinstance(x, kind)
  found = [x for x in jax.tree.leaves(tree, is_leaf=is_kind) if is_kind(x)]
  if len(found) != 1:
    raise ValueError(
        f"opt_state holds {len(found) or 'no'} {what}; pass the state of an "
        f"optimizer with exactly one ({hint})")
  return found[0]
