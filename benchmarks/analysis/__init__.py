"""The Hessian analysis tools against the exact Hessian and PyHessian
(``docs/analysis.md``)."""
