"""Strict JAX configuration for the whole test suite."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402  (the flag above must be set before jax starts)
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "standard_promotion: the test runs optax code (such as optax.adam's bias "
      "correction) that is not clean under strict dtype promotion")


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
  """Our own code must not rely on implicit dtype promotion."""
  mode = ("standard" if request.node.get_closest_marker("standard_promotion")
          else "strict")
  with jax.numpy_dtype_promotion(mode):
    yield
  jax.config.update("jax_enable_x64", False)
