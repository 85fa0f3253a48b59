"""Algorithms over any operator: eigenpairs, trace, spectrum, per layer."""

from adahessian_optax.algorithms._eigen import eigenpairs
from adahessian_optax.algorithms._eigen import Eigenpairs
from adahessian_optax.algorithms._eigen import hessian_eigenvalues
from adahessian_optax.algorithms._eigen import LanczosInfo
from adahessian_optax.algorithms._layers import layer_summary
from adahessian_optax.algorithms._layers import LayerSummary
from adahessian_optax.algorithms._layers import per_layer
from adahessian_optax.algorithms._spectrum import hessian_spectrum
from adahessian_optax.algorithms._spectrum import spectral_density
from adahessian_optax.algorithms._spectrum import SpectralDensity
from adahessian_optax.algorithms._trace import hessian_trace
from adahessian_optax.algorithms._trace import HessianTrace
from adahessian_optax.algorithms._trace import trace

__all__ = (
    "eigenpairs",
    "Eigenpairs",
    "hessian_eigenvalues",
    "LanczosInfo",
    "layer_summary",
    "LayerSummary",
    "per_layer",
    "hessian_spectrum",
    "spectral_density",
    "SpectralDensity",
    "hessian_trace",
    "HessianTrace",
    "trace",
)
