"""The study: AdaHessian against seven optimizers on five tasks, tuned on
validation data (``docs/study.md``)."""
