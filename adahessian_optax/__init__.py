"""AdaHessian for Optax: a Hutchinson-preconditioned optimizer for JAX."""

from adahessian_optax._adahessian import adahessian
from adahessian_optax._adahessian import scale_by_adahessian
from adahessian_optax._adahessian import ScaleByAdaHessianState
from adahessian_optax._hutchinson import hutchinson_diagonal
from adahessian_optax._hutchinson import hutchinson_estimator
from adahessian_optax._hutchinson import HutchinsonResult
from adahessian_optax._hutchinson import HutchinsonState
from adahessian_optax._spatial import block_mean
from adahessian_optax._spatial import BlockMean
from adahessian_optax._spatial import conv_window_mean
from adahessian_optax._spatial import ConvWindowMean
from adahessian_optax._spatial import mean_over_axes
from adahessian_optax._spatial import MeanOverAxes
from adahessian_optax._spatial import SpatialRule

__version__ = "0.1.0"

__all__ = (
    "adahessian",
    "block_mean",
    "BlockMean",
    "conv_window_mean",
    "ConvWindowMean",
    "hutchinson_diagonal",
    "hutchinson_estimator",
    "HutchinsonResult",
    "HutchinsonState",
    "mean_over_axes",
    "MeanOverAxes",
    "scale_by_adahessian",
    "ScaleByAdaHessianState",
    "SpatialRule",
)
