"""examples/gpt.py: the GPT-2-class example, sharded and with a flash kernel.

Each run is a process of its own (the suite's conftest fixes 4 devices in
this one; these runs need 8, or a Pallas kernel interpreted on the CPU).
"""

import json

import numpy as np
import pytest

pytest.importorskip("flax")

# 16-27 s for the sharded test and 18-32 s for the flash one (two runs) on 2
# cores with the suite's compile flags, as load varies (2026-12-06).
pytestmark = pytest.mark.slow

OPTIMIZERS = ["AdamW", "AdaHessian", "AdaHessian-GNB", "Sophia-G"]


def _runs(run_script, tmp_path, *argv):
  run_script("examples/gpt.py", "--smoke", "--no-progress", "--out",
             str(tmp_path), *argv)
  return json.loads((tmp_path / "gpt_results.json").read_text())["runs"]


def test_sharded_run_equals_one_device_and_the_loss_falls(
    run_script, script_env, tmp_path):
  # FSDP over 8 simulated devices: every matrix sharded on one axis, the
  # batch of 8 split one row per device; the same 6 steps on one device.
  script_env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
  runs = _runs(run_script, tmp_path, "--devices", "1", "8")
  assert [(r["optimizer"], r["devices"]) for r in runs] == [
      (name, n) for name in OPTIMIZERS for n in (1, 8)]
  for one, sharded in zip(runs[::2], runs[1::2]):
    name = one["optimizer"]
    # From ln 256 (5.55) at initialisation; a warm-up step at rate 0, then
    # five steps: every optimizer moves the training and validation loss
    # down by more than 0.1 (observed 0.12 to 0.33).
    assert one["train_loss"][-1] < one["train_loss"][0] - 0.1, name
    assert one["val_loss"][1] < one["val_loss"][0] - 0.1, name
    # The sharded run sums the batch's and the tokens' terms in another
    # order (per device, then across devices): float32 rounding, 1e-7
    # relative per loss (observed up to 6e-7 after six steps, the
    # preconditioners dividing by small curvature entries amplifying it).
    # The params, of order 1, agree to 1e-5 (observed up to 1.1e-5 without
    # the suite's compile flags): the bounds leave 10x to 20x room.
    np.testing.assert_allclose(sharded["train_loss"], one["train_loss"],
                               rtol=1e-5, err_msg=name)
    assert sharded["max_loss_rel_diff"] < 1e-5, name
    assert sharded["max_param_diff"] < 2e-4, name


def test_flash_kernel_trains_with_every_optimizer(run_script, tmp_path):
  # Pallas's flash-attention kernel (a custom VJP), interpreted on the CPU:
  # AdamW, AdaHessian-GNB and Sophia-G differentiate through it, and
  # AdaHessian takes its Hessian-vector product from a closure with XLA
  # attention. The kernel computes the same attention as XLA's in another
  # order (blocks of 16 keys, an online softmax), so the runs agree with
  # XLA attention's to float32 rounding, amplified a little by six steps
  # (observed: equal to 4 decimals).
  (tmp_path / "flash").mkdir()
  (tmp_path / "xla").mkdir()
  flash = _runs(run_script, tmp_path / "flash", "--attention", "flash",
                "--flash-block", "16")
  xla = _runs(run_script, tmp_path / "xla")
  assert [r["optimizer"] for r in flash] == OPTIMIZERS
  for f, x in zip(flash, xla):
    assert f["finite"], f["optimizer"]
    np.testing.assert_allclose(f["train_loss"], x["train_loss"], rtol=1e-4,
                               err_msg=f["optimizer"])
    np.testing.assert_allclose(f["val_loss"], x["val_loss"], rtol=1e-4,
                               err_msg=f["optimizer"])
