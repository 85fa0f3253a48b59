"""Analysis on top of the algorithms: sharpness and loss landscapes."""

from adahessian_optax.analysis._landscape import filter_normalized_direction
from adahessian_optax.analysis._landscape import loss_landscape
from adahessian_optax.analysis._sharpness import adahessian_preconditioner
from adahessian_optax.analysis._sharpness import adam_preconditioner
from adahessian_optax.analysis._sharpness import stability_threshold

__all__ = (
    "filter_normalized_direction",
    "loss_landscape",
    "adahessian_preconditioner",
    "adam_preconditioner",
    "stability_threshold",
)
