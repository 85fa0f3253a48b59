"""Step time and memory of AdaHessian against Adam, the Hessian-vector-product
floor and torch-optimizer (``docs/benchmarks.md``)."""
