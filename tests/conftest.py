"""Strict JAX configuration for the whole test suite."""

import os
import pathlib
import subprocess
import sys

# The suite compiles many small programs (test_analysis.py alone: 378, 81%
# of its time), mostly in XLA:CPU's LLVM optimisation. Without it (-O0, and
# the elemental emitters instead of the fusion emitters) the fast set runs
# 2.4x faster (462 s -> 192 s on 2 cores). Only rounding changes, so tests
# that compare two different programs allow for float32 summation order.
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")

import jax  # noqa: E402  (the flags above must be set before jax starts)
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.fixture
def script_env():
  """The environment of a script run in a process of its own: CPU, the
  suite's compile flags, the repository on the path."""
  path = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
  return dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
              XLA_FLAGS=FAST_COMPILE, PYTHONPATH=os.pathsep.join(path))


@pytest.fixture
def run_script(script_env):  # pylint: disable=redefined-outer-name
  """`run_script(*argv, timeout=300)` runs `python *argv` from the
  repository root in `script_env`, asserts it succeeds and returns its
  stdout."""
  def run(*argv, timeout=300):
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=script_env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
  return run
