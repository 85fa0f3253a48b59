"""Curvature-diagonal estimators: the contract, Hutchinson's, GNB's."""

from adahessian_optax.estimators._base import Estimate
from adahessian_optax.estimators._base import Estimator
from adahessian_optax.estimators._base import EstimatorState
from adahessian_optax.estimators._base import HessianEstimate
from adahessian_optax.estimators._base import value_grad_and_hessian
from adahessian_optax.estimators._gnb import gnb_diagonal
from adahessian_optax.estimators._gnb import gnb_estimator
from adahessian_optax.estimators._hutchinson import hutchinson_diagonal
from adahessian_optax.estimators._hutchinson import hutchinson_estimator

__all__ = (
    "Estimate",
    "Estimator",
    "EstimatorState",
    "HessianEstimate",
    "value_grad_and_hessian",
    "gnb_diagonal",
    "gnb_estimator",
    "hutchinson_diagonal",
    "hutchinson_estimator",
)
