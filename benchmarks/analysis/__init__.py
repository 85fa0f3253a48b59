"""The Hessian analysis tools against the exact Hessian, PyHessian and
hessian-eigenthings (``docs/analysis.md``)."""
