"""The PyTorch peers of the analysis benchmarks, with product counters.

PyHessian 0.1 and hessian-eigenthings 1.0.0a5, benchmark peers and never
dependencies of the package. Installed on torch's CPU build (the order
matters: any other torch request pulls GBs of CUDA packages)::

  pip install torch==2.13.0
  pip install --no-deps pyhessian==0.1 hessian-eigenthings==1.0.0a5

(hessian-eigenthings also imports numpy, scipy and tqdm, which the
project's own extras install.) Each peer gets the network of
``common.models.small_torch`` holding the same weights as the JAX one.
"""

import importlib
import warnings

import numpy as np

from benchmarks.analysis import problems
from benchmarks.common import models


def available(*names) -> bool:
  """Whether torch and the named peer modules import."""
  try:
    for name in ("torch",) + names:
      importlib.import_module(name)
  except ImportError:
    return False
  return True


class TorchProblem:
  """The torch twin of a `problems.Problem`: model, batch and criterion."""

  def __init__(self, problem: problems.Problem, threads: int):
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    self.model = models.small_torch(problem.name, problem.params)
    x, y = problem.batch
    self.x = torch.tensor(np.asarray(x))
    self.y = torch.tensor(np.asarray(y)).long()
    self.criterion = torch.nn.CrossEntropyLoss()
    jax_loss = float(problem.value_fn(problem.params))
    with torch.no_grad():
      torch_loss = float(self.criterion(self.model(self.x), self.y))
    assert abs(jax_loss - torch_loss) < 1e-5 * max(1, jax_loss), (
        jax_loss, torch_loss)

  @property
  def data(self):
    return (self.x, self.y)


# --------------------------------------------------------------------------
# PyHessian 0.1.


def patch_pyhessian() -> dict:
  """torch.eig for PyHessian 0.1's density, and an HVP counter.

  PyHessian 0.1 calls ``torch.eig``, which torch 2 removed: supplied as
  ``torch.linalg.eigh`` of the symmetric tridiagonal matrix, in
  ``torch.eig``'s layout. Returns the counter, ``{"hvps": n}``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  module = importlib.import_module("pyhessian.hessian")
  # PyHessian 0.1 builds its graph with loss.backward(create_graph=True).
  warnings.filterwarnings("ignore", "Using backward", UserWarning)

  def eig(t, eigenvectors=False):
    values, vectors = torch.linalg.eigh(t)
    return torch.stack([values, torch.zeros_like(values)], 1), vectors

  torch.eig = eig
  counter = {"hvps": 0}
  if not hasattr(module, "_counted"):
    original = module.hessian_vector_product

    def counted(*a, **kw):
      counter["hvps"] += 1
      return original(*a, **kw)

    module.hessian_vector_product = counted
    module._counted = counter  # pylint: disable=protected-access
    original_loader = module.hessian.dataloader_hv_product

    def counted_loader(self, v):
      counter["hvps"] += 1
      return original_loader(self, v)

    module.hessian.dataloader_hv_product = counted_loader
  return module._counted  # pylint: disable=protected-access


# --------------------------------------------------------------------------
# hessian-eigenthings 1.0.0a5.


def counted_operator(operator, counter: dict, key: str = "products"):
  """`operator` (a ``CurvatureOperator``) with its products counted in
  ``counter[key]``: every algorithm of the library calls ``matvec``."""
  import hessian_eigenthings as he  # pylint: disable=import-outside-toplevel

  class Counted(he.CurvatureOperator):

    size = property(lambda self: operator.size)
    device = property(lambda self: operator.device)
    dtype = property(lambda self: operator.dtype)

    def matvec(self, v):
      counter[key] += 1
      return operator.matvec(v)

  return Counted()


def eigenthings_operators(tp: TorchProblem, counter: dict) -> dict:
  """``{"hessian": ..., "ggn": ...}``: its Hessian (autograd double
  backward, its default) and GGN operators on the one batch, counted."""
  import hessian_eigenthings as he  # pylint: disable=import-outside-toplevel
  loader = [tp.data]  # one batch: every product is over the same batch
  hessian = he.HessianOperator(tp.model, loader,
                               he.supervised_loss(tp.criterion))
  ggn = he.GGNOperator(tp.model, loader, he.supervised_forward,
                       he.supervised_loss_of_output(tp.criterion))
  return {"hessian": counted_operator(hessian, counter),
          "ggn": counted_operator(ggn, counter)}
