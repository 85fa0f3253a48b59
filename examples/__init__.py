"""The examples; each also runs as a script (``python examples/digits.py``)."""
