"""The benchmarks and the study; run them as modules from the repository
root (``python -m benchmarks.speed.step_cost``); see ``benchmarks/README.md``.
"""
