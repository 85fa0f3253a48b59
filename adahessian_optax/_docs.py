"""Argument documentation written once, filled into the docstrings.

A docstring line holding only ``<<name>>`` becomes the entry (or, for a
group such as ``per_layer_settings``, the entries) written below, indented
like the placeholder.
"""

import re
from typing import Callable

_ARGS = {
    "op": """op: a :class:`~adahessian_optax.LinearOperator`, from
  :func:`~adahessian_optax.curvature_operator` (a Hessian, GGN, empirical
  Fisher, sub-batch, dataset or finite-difference curvature) or your own
  (:func:`~adahessian_optax.linear_operator`).""",
    "value_fn": """value_fn: the loss, ``params -> scalar`` (a plain closure: its Hessian),
  a curvature kind (:func:`~adahessian_optax.ggn`,
  :func:`~adahessian_optax.empirical_fisher`,
  :func:`~adahessian_optax.finite_difference`,
  :func:`~adahessian_optax.sub_batch_value_fn`), or a
  :class:`~adahessian_optax.DatasetLoss`.""",
    "wrt": """wrt: which parameters the operator acts on: None (all), a pytree prefix
  of params with bool leaves, or boolean arrays broadcastable to the
  leaves below them (to pick one layer of a stacked leaf), or a function
  of params returning one, as optax's masks. The operator is then the
  diagonal block of the selected entries.""",
    "preconditioner": """preconditioner: a positive diagonal :math:`P`, a pytree like params (any
  containers with the same leaves in the same order, such as an
  ``nnx.Optimizer``'s boxed state), e.g. from
  :func:`~adahessian_optax.adam_preconditioner`: analyse
  :math:`P^{-1/2} H P^{-1/2}`, which has the eigenvalues of
  :math:`P^{-1} H`, instead of :math:`H`.""",
    # per_layer's and layer_summary's settings.
    "per_layer_settings": """key: an int seed or a JAX PRNG key.
n_samples: Hutchinson probes for the traces.
n_steps: the most Lanczos steps per leaf (fewer for a smaller leaf).
tol: the Lanczos tolerance, relative.""",
    "axis_name": """axis_name: inside ``pmap``/``shard_map``, the data-parallel axis over
  which the products are averaged (the replicas share the key).""",
}

_PLACEHOLDER = re.compile(r"^(?P<indent> *)<<(?P<name>\w+)>>$", re.MULTILINE)


def shared(fn: Callable) -> Callable:
  """Fills the ``<<name>>`` lines of `fn`'s docstring (see the module)."""

  def fill(match):
    indent = match.group("indent")
    lines = _ARGS[match.group("name")].splitlines()
    return "\n".join(indent + line for line in lines)

  if fn.__doc__:
    fn.__doc__ = _PLACEHOLDER.sub(fill, fn.__doc__)
  return fn
