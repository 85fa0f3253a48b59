"""Data-parallel AdaHessian on many processes with JAX's distributed runtime.

Every process runs this same program (multi-controller JAX). The global batch
is sharded over all devices of all processes along the mesh axis ``"data"``;
params and optimizer state are replicated. Each process puts only its own
rows of each global batch on its devices.

Run it on one machine as N processes talking over loopback (CPU devices,
Gloo collectives; each process gets ``--cpu-devices`` devices)::

    python examples/multihost.py --launch-local 2

On a cluster, start one copy per host; ``jax.distributed.initialize()``
reads the coordinator, the process count and the process id from the
environment (SLURM, Open MPI, Cloud TPU pods, ...)::

    srun --nodes=2 --ntasks-per-node=1 python examples/multihost.py
    gcloud compute tpus tpu-vm ssh NAME --worker=all \\
        --command="python examples/multihost.py"

or pass them yourself with ``--coordinator HOST:PORT --num-processes N
--process-id I``. ``--mode shard_map`` runs the same training with
``jax.shard_map`` and ``axis_name="data"`` instead of ``jax.jit`` with
shardings (``--mode both`` runs one after the other). See
docs/distributed.md.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adahessian_optax as aho

AXIS = "data"


def make_dataset(seed=0, n=512, features=8, classes=4):
  """A synthetic classification set, identical on every process."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, features)) * 1.5
  y = rng.integers(0, classes, n)
  x = centers[y] + rng.normal(size=(n, features))
  return x.astype(np.float32), y.astype(np.int32)


def init_params(seed=0, features=8, hidden=32, classes=4):
  rng = np.random.default_rng(seed + 1)
  return {
      "w1": (rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(
          np.float32),
      "b1": np.zeros(hidden, np.float32),
      "w2": (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(
          np.float32),
      "b2": np.zeros(classes, np.float32),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_optimizer(axis_name=None):
  return aho.adahessian(learning_rate=0.05, weight_decay=1e-4, key=0,
                        axis_name=axis_name)


def batch_rows(step, batch_size, n):
  start = (step * batch_size) % n
  return np.arange(start, start + batch_size) % n


def local_rows(sharding, global_shape):
  """The rows of the global batch held by this process's devices."""
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(global_shape[0] if rows.stop is None else rows.stop)
  lo, hi = min(starts), max(stops)
  if sum(b - a for a, b in set(zip(starts, stops))) != hi - lo:
    raise ValueError("this process's batch rows are not contiguous")
  return slice(lo, hi)


def train(mesh, steps=20, batch_size=64, mode="jit", seed=0):
  """Trains on `mesh`; returns (final params as NumPy, per-step losses)."""
  x_all, y_all = make_dataset(seed)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(AXIS))

  def global_batch(step):
    rows = batch_rows(step, batch_size, len(x_all))
    mine = local_rows(batch_sharding, (batch_size,))
    # In a real job each process would load only its own rows from storage.
    return tuple(
        jax.make_array_from_process_local_data(
            batch_sharding, a[rows][mine], (batch_size,) + a.shape[1:])
        for a in (x_all, y_all))

  if mode == "jit":
    tx = make_optimizer()

    @jax.jit
    def train_step(params, opt_state, x, y):
      loss_of = lambda p: loss_fn(p, x, y)
      loss, grads = jax.value_and_grad(loss_of)(params)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     value_fn=loss_of)
      return optax.apply_updates(params, updates), opt_state, loss

  elif mode == "shard_map":
    tx = make_optimizer(axis_name=AXIS)

    def local_step(params, opt_state, x, y):
      # Each device sees its slice of the batch; the loss is the mean over
      # the axis. Differentiating that mean and then taking pmean gives the
      # mean gradient under shard_map (whose autodiff psums gradients of
      # replicated params) and under pmap alike. `tx` averages its Hessian
      # estimate over axis_name itself.
      loss_of = lambda p: jax.lax.pmean(loss_fn(p, x, y), AXIS)
      loss, grads = jax.value_and_grad(loss_of)(params)
      grads = jax.lax.pmean(grads, AXIS)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     value_fn=loss_of)
      return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
        out_specs=(P(), P(), P())))
  else:
    raise ValueError(f"unknown mode {mode!r}")

  params = jax.device_put(init_params(seed), replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  losses = []
  for step in range(steps):
    params, opt_state, loss = train_step(params, opt_state, *global_batch(step))
    losses.append(np.asarray(loss.addressable_data(0)))
  params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
  return params, np.stack(losses)


def accuracy(params, seed=0):
  x, y = make_dataset(seed)
  logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
  return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(args):
  """Runs `args.launch_local` copies of this script on 127.0.0.1."""
  n = args.launch_local
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.cpu_devices}")
  common = [sys.executable, os.path.abspath(__file__), "--cpu",
            "--coordinator", f"127.0.0.1:{free_port()}",
            "--num-processes", str(n), "--mode", args.mode,
            "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
  if args.save:
    common += ["--save", args.save]
  procs = []
  try:
    for i in range(n):
      procs.append(subprocess.Popen(common + ["--process-id", str(i)],
                                    env=env))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
      codes = [p.poll() for p in procs]
      if any(c not in (None, 0) for c in codes):
        print(f"a process failed (exit codes {codes})", file=sys.stderr)
        return 1
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.1)
    print(f"timed out after {args.timeout} s", file=sys.stderr)
    return 1
  finally:
    for p in procs:  # never leave a process behind, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--launch-local", type=int, metavar="N",
                      help="start N processes of this script on 127.0.0.1")
  parser.add_argument("--cpu-devices", type=int, default=2,
                      help="CPU devices per process with --launch-local")
  parser.add_argument("--timeout", type=float, default=300.0,
                      help="seconds before --launch-local gives up")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--cpu", action="store_true",
                      help="CPU devices with Gloo collectives (set by "
                      "--launch-local)")
  parser.add_argument("--mode", choices=("jit", "shard_map", "both"),
                      default="jit")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--save", metavar="DIR",
                      help="write final params and losses to "
                      "DIR/<mode>_process_<id>.npz")
  args = parser.parse_args(argv)

  if args.launch_local:
    return launch_local(args)

  if args.cpu:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.coordinator:
    jax.distributed.initialize(args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  else:
    try:
      jax.distributed.initialize()  # SLURM, Open MPI, TPU pods, Kubernetes
    except ValueError as e:
      raise SystemExit(
          f"{e}\nNo cluster found: pass --coordinator, --num-processes and "
          "--process-id, or try --launch-local 2 on this machine.") from e

  mesh = jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(AxisType.Auto,))
  if args.batch_size % jax.device_count():
    raise ValueError(f"--batch-size {args.batch_size} must be divisible by "
                     f"the {jax.device_count()} devices")
  lead = jax.process_index() == 0
  if lead:
    print(f"{jax.process_count()} processes, {jax.device_count()} devices "
          f"({jax.local_device_count()} per process), mode={args.mode}",
          flush=True)
  modes = ("jit", "shard_map") if args.mode == "both" else (args.mode,)
  for mode in modes:
    params, losses = train(mesh, steps=args.steps,
                           batch_size=args.batch_size, mode=mode)
    if lead:
      for step in range(0, len(losses), max(1, len(losses) // 10)):
        print(f"[{mode}] step {step:4d}  loss {losses[step]:.4f}")
      print(f"[{mode}] final loss {losses[-1]:.4f}, "
            f"train accuracy {accuracy(params):.3f}", flush=True)
    if args.save:
      os.makedirs(args.save, exist_ok=True)
      name = f"{mode}_process_{jax.process_index()}.npz"
      np.savez(os.path.join(args.save, name), losses=losses, **params)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
