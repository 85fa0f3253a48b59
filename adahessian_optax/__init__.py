"""AdaHessian for Optax: a Hutchinson-preconditioned optimizer for JAX."""

import importlib.util

from adahessian_optax.optimizer._adahessian import adahessian
from adahessian_optax.optimizer._adahessian import PerformanceWarning
from adahessian_optax.optimizer._adahessian import scale_by_adahessian
from adahessian_optax.optimizer._adahessian import ScaleByAdaHessianState
from adahessian_optax.algorithms._analysis import DatasetLoss
from adahessian_optax.algorithms._analysis import Eigenpairs
from adahessian_optax.algorithms._analysis import hessian_eigenvalues
from adahessian_optax.algorithms._analysis import hessian_spectrum
from adahessian_optax.algorithms._analysis import hessian_trace
from adahessian_optax.algorithms._analysis import HessianTrace
from adahessian_optax.algorithms._analysis import LanczosInfo
from adahessian_optax.algorithms._analysis import layer_summary
from adahessian_optax.algorithms._analysis import LayerSummary
from adahessian_optax.algorithms._analysis import SpectralDensity
from adahessian_optax.optimizer._compose import masked_value_fn
from adahessian_optax.optimizer._compose import unmask_params
from adahessian_optax.operators._curvature import sub_batch_value_fn
from adahessian_optax.operators._curvature import SubBatchValueFn
from adahessian_optax.operators._ggn import ggn
from adahessian_optax.operators._ggn import GGN
from adahessian_optax.operators._ggn import SoftmaxCrossEntropy
from adahessian_optax.operators._ggn import SquaredError
from adahessian_optax.estimators._gnb import gnb_diagonal
from adahessian_optax.estimators._gnb import gnb_estimator
from adahessian_optax.estimators._gnb import GNBResult
from adahessian_optax.estimators._gnb import GNBState
from adahessian_optax.estimators._hutchinson import HessianEstimate
from adahessian_optax.estimators._hutchinson import hutchinson_diagonal
from adahessian_optax.estimators._hutchinson import hutchinson_estimator
from adahessian_optax.estimators._hutchinson import HutchinsonResult
from adahessian_optax.estimators._hutchinson import HutchinsonState
from adahessian_optax.estimators._hutchinson import value_grad_and_hessian
from adahessian_optax.analysis._landscape import filter_normalized_direction
from adahessian_optax.analysis._landscape import loss_landscape
from adahessian_optax.optimizer._layouts import spatial_rules
from adahessian_optax.analysis._sharpness import adahessian_preconditioner
from adahessian_optax.analysis._sharpness import adam_preconditioner
from adahessian_optax.analysis._sharpness import stability_threshold
from adahessian_optax.optimizer._spatial import block_mean
from adahessian_optax.optimizer._spatial import BlockMean
from adahessian_optax.optimizer._spatial import conv_window_mean
from adahessian_optax.optimizer._spatial import ConvWindowMean
from adahessian_optax.optimizer._spatial import mean_over_axes
from adahessian_optax.optimizer._spatial import MeanOverAxes
from adahessian_optax.optimizer._spatial import SpatialRule

__version__ = "0.5.2"

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

__all__ = (
    "adahessian",
    "adahessian_preconditioner",
    "adam_preconditioner",
    "block_mean",
    "BlockMean",
    "conv_window_mean",
    "ConvWindowMean",
    "DatasetLoss",
    "Eigenpairs",
    "filter_normalized_direction",
    "ggn",
    "GGN",
    "gnb_diagonal",
    "gnb_estimator",
    "GNBResult",
    "GNBState",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "HessianEstimate",
    "HessianTrace",
    "hutchinson_diagonal",
    "hutchinson_estimator",
    "HutchinsonResult",
    "HutchinsonState",
    "LanczosInfo",
    "layer_summary",
    "LayerSummary",
    "loss_landscape",
    "masked_value_fn",
    "mean_over_axes",
    "MeanOverAxes",
    "PerformanceWarning",
    "scale_by_adahessian",
    "ScaleByAdaHessianState",
    "SoftmaxCrossEntropy",
    "spatial_rules",
    "SpatialRule",
    "SpectralDensity",
    "SquaredError",
    "stability_threshold",
    "sub_batch_value_fn",
    "SubBatchValueFn",
    "unmask_params",
    "value_grad_and_hessian",
)
# The Flax helpers are listed only where flax is installed, so that
# `from adahessian_optax import *` works without it.
if importlib.util.find_spec("flax") is not None:
  __all__ += _FLAX_NAMES
