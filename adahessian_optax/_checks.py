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
