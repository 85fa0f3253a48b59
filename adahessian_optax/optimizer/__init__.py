"""The AdaHessian optimizer, its spatial averaging and its composition."""

from adahessian_optax.optimizer._alias import adahessian
from adahessian_optax.optimizer._adahessian import scale_by_adahessian
from adahessian_optax.optimizer._adahessian import ScaleByAdaHessianState
from adahessian_optax.optimizer._compose import masked_value_fn
from adahessian_optax.optimizer._compose import unmask_params
from adahessian_optax.optimizer._layouts import spatial_rules
from adahessian_optax.optimizer._spatial import block_mean
from adahessian_optax.optimizer._spatial import BlockMean
from adahessian_optax.optimizer._spatial import conv_window_mean
from adahessian_optax.optimizer._spatial import ConvWindowMean
from adahessian_optax.optimizer._spatial import mean_over_axes
from adahessian_optax.optimizer._spatial import MeanOverAxes
from adahessian_optax.optimizer._spatial import SpatialRule

__all__ = (
    "adahessian",
    "scale_by_adahessian",
    "ScaleByAdaHessianState",
    "masked_value_fn",
    "unmask_params",
    "spatial_rules",
    "block_mean",
    "BlockMean",
    "conv_window_mean",
    "ConvWindowMean",
    "mean_over_axes",
    "MeanOverAxes",
    "SpatialRule",
)
