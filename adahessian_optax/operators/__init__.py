"""Curvature operators: the curvature kinds and the operator core."""

from adahessian_optax.operators._base import linear_operator
from adahessian_optax.operators._base import LinearOperator
from adahessian_optax.operators._curvature import Curvature
from adahessian_optax.operators._curvature import curvature_operator
from adahessian_optax.operators._curvature import Hessian
from adahessian_optax.operators._dataset import DatasetLoss
from adahessian_optax.operators._finite_difference import finite_difference
from adahessian_optax.operators._finite_difference import FiniteDifference
from adahessian_optax.operators._fisher import empirical_fisher
from adahessian_optax.operators._fisher import EmpiricalFisher
from adahessian_optax.operators._ggn import ggn
from adahessian_optax.operators._ggn import GGN
from adahessian_optax.operators._ggn import SoftmaxCrossEntropy
from adahessian_optax.operators._ggn import SquaredError
from adahessian_optax.operators._sub_batch import sub_batch_value_fn
from adahessian_optax.operators._sub_batch import SubBatchValueFn

__all__ = (
    "linear_operator",
    "LinearOperator",
    "Curvature",
    "curvature_operator",
    "Hessian",
    "DatasetLoss",
    "finite_difference",
    "FiniteDifference",
    "empirical_fisher",
    "EmpiricalFisher",
    "ggn",
    "GGN",
    "SoftmaxCrossEntropy",
    "SquaredError",
    "sub_batch_value_fn",
    "SubBatchValueFn",
)
