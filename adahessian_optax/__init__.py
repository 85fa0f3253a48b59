"""AdaHessian for Optax, and curvature analysis on one operator core.

Subpackages: ``operators`` (curvature kinds and the operator), ``algorithms``
(over any operator), ``estimators`` (curvature diagonals for optimizers),
``optimizer`` (AdaHessian), ``analysis`` (sharpness, landscapes). Every
public name is importable from here.
"""

from adahessian_optax.algorithms import eigenpairs
from adahessian_optax.algorithms import Eigenpairs
from adahessian_optax.algorithms import hessian_eigenvalues
from adahessian_optax.algorithms import hessian_spectrum
from adahessian_optax.algorithms import hessian_trace
from adahessian_optax.algorithms import HessianTrace
from adahessian_optax.algorithms import LanczosInfo
from adahessian_optax.algorithms import layer_summary
from adahessian_optax.algorithms import LayerSummary
from adahessian_optax.algorithms import per_layer
from adahessian_optax.algorithms import spectral_density
from adahessian_optax.algorithms import SpectralDensity
from adahessian_optax.algorithms import trace
from adahessian_optax.analysis import adahessian_preconditioner
from adahessian_optax.analysis import adam_preconditioner
from adahessian_optax.analysis import filter_normalized_direction
from adahessian_optax.analysis import loss_landscape
from adahessian_optax.analysis import stability_threshold
from adahessian_optax.estimators import Estimate
from adahessian_optax.estimators import Estimator
from adahessian_optax.estimators import EstimatorState
from adahessian_optax.estimators import gnb_diagonal
from adahessian_optax.estimators import gnb_estimator
from adahessian_optax.estimators import HessianEstimate
from adahessian_optax.estimators import hutchinson_diagonal
from adahessian_optax.estimators import hutchinson_estimator
from adahessian_optax.estimators import value_grad_and_hessian
from adahessian_optax.operators import Curvature
from adahessian_optax.operators import curvature_operator
from adahessian_optax.operators import DatasetLoss
from adahessian_optax.operators import empirical_fisher
from adahessian_optax.operators import EmpiricalFisher
from adahessian_optax.operators import finite_difference
from adahessian_optax.operators import FiniteDifference
from adahessian_optax.operators import ggn
from adahessian_optax.operators import GGN
from adahessian_optax.operators import Hessian
from adahessian_optax.operators import linear_operator
from adahessian_optax.operators import LinearOperator
from adahessian_optax.operators import SoftmaxCrossEntropy
from adahessian_optax.operators import SquaredError
from adahessian_optax.operators import sub_batch_value_fn
from adahessian_optax.operators import SubBatchValueFn
from adahessian_optax.optimizer import adahessian
from adahessian_optax.optimizer import block_mean
from adahessian_optax.optimizer import BlockMean
from adahessian_optax.optimizer import conv_window_mean
from adahessian_optax.optimizer import ConvWindowMean
from adahessian_optax.optimizer import masked_value_fn
from adahessian_optax.optimizer import mean_over_axes
from adahessian_optax.optimizer import MeanOverAxes
from adahessian_optax.optimizer import scale_by_adahessian
from adahessian_optax.optimizer import ScaleByAdaHessianState
from adahessian_optax.optimizer import spatial_rules
from adahessian_optax.optimizer import SpatialRule
from adahessian_optax.optimizer import unmask_params

__version__ = "0.6.1"

# Loaded on first use so that importing the package does not need flax.
_FLAX_NAMES = ("nnx_value_fn", "TrainState")


def __getattr__(name):
  if name in _FLAX_NAMES:
    try:
      from adahessian_optax.optimizer import _flax  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"adahessian_optax.{name} needs flax: pip install "
          "'adahessian-optax[flax]'") from e
    return getattr(_flax, name)
  raise AttributeError(f"module 'adahessian_optax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_FLAX_NAMES))


def _has_flax() -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("flax") is not None


__all__ = (
    "adahessian",
    "adahessian_preconditioner",
    "adam_preconditioner",
    "block_mean",
    "BlockMean",
    "conv_window_mean",
    "ConvWindowMean",
    "Curvature",
    "curvature_operator",
    "DatasetLoss",
    "eigenpairs",
    "Eigenpairs",
    "empirical_fisher",
    "EmpiricalFisher",
    "Estimate",
    "Estimator",
    "EstimatorState",
    "filter_normalized_direction",
    "finite_difference",
    "FiniteDifference",
    "ggn",
    "GGN",
    "gnb_diagonal",
    "gnb_estimator",
    "Hessian",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "HessianEstimate",
    "HessianTrace",
    "hutchinson_diagonal",
    "hutchinson_estimator",
    "LanczosInfo",
    "layer_summary",
    "LayerSummary",
    "linear_operator",
    "LinearOperator",
    "loss_landscape",
    "masked_value_fn",
    "mean_over_axes",
    "MeanOverAxes",
    "per_layer",
    "scale_by_adahessian",
    "ScaleByAdaHessianState",
    "SoftmaxCrossEntropy",
    "spatial_rules",
    "SpatialRule",
    "spectral_density",
    "SpectralDensity",
    "SquaredError",
    "stability_threshold",
    "sub_batch_value_fn",
    "SubBatchValueFn",
    "trace",
    "unmask_params",
    "value_grad_and_hessian",
)
# The Flax helpers are listed only where flax is installed, so that
# `from adahessian_optax import *` works without it.
if _has_flax():
  __all__ += _FLAX_NAMES
