"""Memory at GPT-2 scale: the four optimizers' steps, from XLA's plans.

Compile-time plans only (``jax.jit(step).lower(*abstract).compile()
.memory_analysis()`` on :class:`jax.ShapeDtypeStruct` arguments; nothing is
allocated, so any size compiles on a CPU) of one training step of
``examples/gpt.py``'s decoder at 124M (GPT-2 small), 355M and 774M
parameters, vocabulary 50257, sequences of 1024 tokens, 4 sequences per
device: on one device, and per device on an 8-device FSDP mesh of
simulated CPU devices (every matrix sharded on one axis, the batch of 32
split over the same devices). For each: AdamW; AdaHessian's fused refresh
step, plain and with ``chunks=4`` (one sequence of each device per piece);
AdaHessian's plain call with ``chunks=4`` (the whole batch's gradient,
then the products in pieces, at ``update_interval=1``); AdaHessian with
the GNB estimator, fused, and with the estimate on every 4th sequence in
the optimizer's own ``lax.cond``; Sophia-G (GNB) on the whole batch and on
every 4th sequence. Each without and with per-block remat. Reported:
temporary bytes, and temporary plus output bytes (XLA uses the output
buffers for temporaries before the outputs are written), over AdamW's with
the same model settings; argument and output bytes; the optimizer state's
bytes; and the seconds and the process's peak resident memory of each
compile. Then the memory settings (remat; chunks and strides equal to the
sequences per device) and AdamW with remat again at 8 and 16 sequences per
device: where each setting reaches AdamW's bytes as the batch grows.

Goals: AdaHessian's refresh step at the recommended setting (remat and
``chunks`` = the sequences per device) at most AdamW's temporary bytes,
sharded too; a GNB refresh step at most 1.1x AdamW's; optimizer state
equal to Adam's (plus a few scalars). Each is checked at every batch.

Each (size, device count) runs in a process of its own, one compile at a
time, at low priority (``nice``), and its larger batches in another. The
full run took about 9 minutes on this project's shared 2-core CPU machine
(156 compiles of 1 to 8 s, in processes whose resident memory peaked
under 1.2 GiB); ``--quick`` compiles the ``mini`` configuration only.

Usage (from the repository root)::

  python -m benchmarks.speed.memory_scale \\
      [--json docs/results/memory_scale.json] [--quick]
"""

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.common import report as _report

SIZES = ("124M", "355M", "774M")
DEVICES = (1, 8)
PER_DEVICE = 4   # sequences per device
SWEEP = (PER_DEVICE, 8, 16)   # sequences per device for the break-even
SEQ_LEN = 1024
CHUNKS = 4       # = PER_DEVICE: one sequence of each device per piece
STRIDE = 4       # GNB on every 4th sequence: one per device
INTERVAL = 10    # refresh interval inside the optimizers' lax.cond

# key -> (label, optimizer, examples.gpt.Settings fields)
VARIANTS = {
    "adamw": ("AdamW", "AdamW", {}),
    "adahessian": ("AdaHessian, fused refresh step", "AdaHessian", {}),
    "chunks": (f"AdaHessian, fused, `chunks={CHUNKS}`", "AdaHessian",
               {"chunks": CHUNKS}),
    "chunks_plain": (f"AdaHessian, the gradient, then `chunks={CHUNKS}` "
                     "products (plain call)", "AdaHessian",
                     {"fused": False, "chunks": CHUNKS}),
    "gnb": ("AdaHessian-GNB, fused refresh step", "AdaHessian-GNB", {}),
    "gnb_stride": (f"AdaHessian-GNB, estimate on every {STRIDE}th sequence "
                   "in its `lax.cond`", "AdaHessian-GNB",
                   {"fused": False, "gnb_stride": STRIDE,
                    "hessian_interval": INTERVAL}),
    "sophia": ("Sophia-G", "Sophia-G", {"hessian_interval": INTERVAL}),
    "sophia_stride": (f"Sophia-G, estimate on every {STRIDE}th sequence",
                      "Sophia-G", {"gnb_stride": STRIDE,
                                   "hessian_interval": INTERVAL}),
}
RECOMMENDED = {"AdaHessian": "chunks+remat", "AdaHessian-GNB":
               "gnb_stride+remat", "Sophia-G": "sophia_stride+remat"}
# The memory settings measured at more sequences per device (remat; chunks
# and strides = the sequences per device).
SWEPT = {"AdaHessian, fused, chunks": "chunks+remat",
         "AdaHessian, plain call, chunks": "chunks_plain+remat",
         "AdaHessian-GNB, strided, in its `lax.cond`": "gnb_stride+remat",
         "Sophia-G, strided": "sophia_stride+remat"}
GIB = 2 ** 30


class _PeakRSS:
  """This process's peak resident set while in the block (the kernel's
  high-water mark, ``VmHWM``, reset on entry through
  ``/proc/self/clear_refs``), and its growth over the resident set on
  entry (which understates a compile that reuses memory freed by the
  previous one)."""

  def __enter__(self):
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    self.base = self._status("VmRSS")
    return self

  def __exit__(self, *exc):
    self.peak = self._status("VmHWM")
    self.growth = self.peak - self.base

  @staticmethod
  def _status(field: str) -> int:
    with open("/proc/self/status") as f:
      return 1024 * int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _collectives(text: str) -> dict:
  ops = re.findall(r"= \S+ (all-gather|all-to-all|collective-permute|"
                   r"all-reduce|reduce-scatter)(?:-start)?\(", text)
  return {op: ops.count(op) for op in sorted(set(ops))}


def measure_group(size: str, devices: int, keys=None,
                  per_device: int = PER_DEVICE) -> dict:
  """Every variant of one size on one device count (in this process), with
  ``per_device`` sequences on each device; the chunks and strides of the
  variants are scaled with it (one sequence of each device per piece)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from examples import gpt  # pylint: disable=import-outside-toplevel

  if jax.device_count() < devices:
    raise SystemExit(f"{devices} devices needed, {jax.device_count()} here")
  mesh = gpt.make_mesh(devices)
  seq_len = min(SEQ_LEN, gpt.CONFIGS[size].context)
  batch = jax.ShapeDtypeStruct(
      (per_device * devices, seq_len + 1), jnp.int32,
      sharding=gpt.batch_sharding(mesh))

  def abstract(tree):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=s), tree, gpt.shardings(tree, mesh))

  def per_device_bytes(tree):
    return sum(
        int(jnp.dtype(x.dtype).itemsize) * _prod(x.sharding.shard_shape(
            x.shape)) for x in jax.tree.leaves(tree))

  out = {}
  for remat in (False, True):
    cfg = dataclasses.replace(gpt.CONFIGS[size], remat=remat)
    graphdef, params = gpt.build(cfg, abstract=True)
    params = abstract(params)
    rules = gpt.spatial_rules(cfg)
    for key, (_, optimizer, fields) in VARIANTS.items():
      name = key + ("+remat" if remat else "")
      if keys and name not in keys:
        continue
      s = gpt.Settings(optimizer=optimizer, **_scaled(fields, per_device))
      tx = gpt.make_tx(s, rules)
      opt_state = abstract(jax.eval_shape(tx.init, params))
      replicated = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec())
      step = jax.jit(
          functools.partial(gpt.train_step, cfg, graphdef, tx, s,
                            refresh=True),
          out_shardings=(gpt.shardings(params, mesh),
                         gpt.shardings(opt_state, mesh), replicated))
      start = time.perf_counter()
      with _PeakRSS() as rss, jax.set_mesh(mesh):
        compiled = step.lower(params, opt_state, batch).compile()
      seconds = time.perf_counter() - start
      m = compiled.memory_analysis()
      out[name] = {
          "temp": int(m.temp_size_in_bytes),
          "argument": int(m.argument_size_in_bytes),
          "output": int(m.output_size_in_bytes),
          "state": per_device_bytes(opt_state),
          "params": per_device_bytes(params),
          "compile_s": round(seconds, 2),
          "compile_rss": rss.growth,
          "compile_peak_rss": rss.peak,
          "collectives": _collectives(compiled.as_text()),
      }
      print(f"  {size} on {devices}: {name}: temp "
            f"{m.temp_size_in_bytes / GIB:.3f} GiB ({seconds:.1f} s to "
            f"compile, peak resident {rss.peak / GIB:.2f} GiB)", flush=True)
      del compiled, step
  return out


def _scaled(fields: dict, per_device: int) -> dict:
  """A variant's settings with its chunks and strides at ``per_device``."""
  return {k: per_device if k in ("chunks", "gnb_stride") else v
          for k, v in fields.items()}


def _prod(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


def _worker_env(devices: int) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count="
              f"{max(devices, 1)}".strip())


def measure_sweep(size: str, devices: int) -> dict:
  """The memory settings (`SWEPT`) and AdamW's, with remat, at each of
  `SWEEP`'s sequences per device (the first is `measure_group`'s)."""
  keys = ["adamw+remat", *SWEPT.values()]
  return {str(per): measure_group(size, devices, keys, per)
          for per in SWEEP[1:]}


def run_group(size: str, devices: int, sweep: bool = False) -> dict:
  """`measure_group` (or with ``sweep``, `measure_sweep`) in a process of
  its own, at low priority."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "group.json")
    subprocess.run(
        ["nice", "-n", "10", sys.executable, "-m",
         "benchmarks.speed.memory_scale",
         "--sweep-worker" if sweep else "--worker", size, str(devices),
         path], check=True, env=_worker_env(devices))
    with open(path) as f:
      return json.load(f)


# Tables, rendered from docs/results/memory_scale.json.

def _groups(data):
  return [(size, n) for size in data["sizes"] for n in data["devices"]]


def _group_label(size, n):
  return f"{size}, 1 device" if n == 1 else f"{size}, {n} devices"


def _bytes(record: dict, metric: str) -> int:
  """``temp``, or ``work``: temporary plus output bytes, what the step
  needs beyond its arguments (XLA uses the output buffers for temporaries
  before the outputs are written, so temporary bytes alone undercount a
  step whose outputs are large: 774M params and state on one device)."""
  return record["temp"] + (record["output"] if metric == "work" else 0)


def _over_adamw(group: dict, name: str, metric: str = "temp") -> float:
  base = "adamw+remat" if name.endswith("+remat") else "adamw"
  return _bytes(group[name], metric) / _bytes(group[base], metric)


def _ratio_table(data, metric) -> str:
  groups = _groups(data)
  rows = []
  for remat in (False, True):
    for key, (label, _, _) in VARIANTS.items():
      name = key + ("+remat" if remat else "")
      cells = []
      for size, n in groups:
        g = data["results"][size][str(n)]
        cells.append(f"{_over_adamw(g, name, metric):.2f} "
                     f"({_bytes(g[name], metric) / GIB:.2f})")
      rows.append([label + (", remat" if remat else "")] + cells)
  return _report.table(
      ["step"] + [_group_label(*g) for g in groups], rows)


def memory_table(data) -> str:
  """Temporary bytes per device over AdamW's with the same model settings,
  in brackets in GiB."""
  return _ratio_table(data, "temp")


def work_table(data) -> str:
  """Temporary plus output bytes per device (the step's memory beyond its
  arguments) over AdamW's with the same model settings, in brackets in
  GiB."""
  return _ratio_table(data, "work")


def default_table(data) -> str:
  """The recommended settings' temporary plus output bytes over AdamW's
  step at the default settings (no remat)."""
  groups = _groups(data)

  def ratio(size, n, name):
    g = data["results"][size][str(n)]
    return f"{_bytes(g[name], 'work') / _bytes(g['adamw'], 'work'):.2f}"

  rows = [[f"{VARIANTS[name.split('+')[0]][0]}, remat"]
          + [ratio(size, n, name) for size, n in groups]
          for name in ["adamw+remat", *RECOMMENDED.values()]]
  return _report.table(["step"] + [_group_label(*g) for g in groups], rows)


def _sweep_group(data, size, n, per) -> dict:
  if per == data["per_device"]:
    return data["results"][size][str(n)]
  return data["sweep"][size][str(n)][str(per)]


def _extra_buffers(g: dict, name: str) -> float:
  """What the step needs beyond AdamW's with remat (temporary plus output
  bytes), in multiples of the params' bytes per device."""
  return ((_bytes(g[name], "work") - _bytes(g["adamw+remat"], "work"))
          / g[name]["params"])


def sweep_table(data) -> str:
  """The memory settings (remat; chunks and strides = the sequences per
  device) over AdamW's step with remat at the same batch, at each number of
  sequences per device: temporary bytes / temporary plus output bytes."""
  pers = data["sweep_per_device"]
  rows = []
  for size, n in _groups(data):
    for label, name in SWEPT.items():
      cells = []
      for per in pers:
        g = _sweep_group(data, size, n, per)
        cells.append(f"{_over_adamw(g, name):.2f} / "
                     f"{_over_adamw(g, name, 'work'):.2f}")
      rows.append([_group_label(size, n), label] + cells)
  return _report.table(
      ["size, devices", "step"]
      + [f"{per} sequences per device" for per in pers], rows)


def state_table(data) -> str:
  """Per device: the params, the optimizer state (over AdamW's), and the
  step's argument and output bytes, in GiB."""
  rows = []
  for size, n in _groups(data):
    g = data["results"][size][str(n)]
    adam = g["adamw"]["state"]
    for key in ("adamw", "adahessian", "gnb", "sophia"):
      r = g[key]
      rows.append([_group_label(size, n), VARIANTS[key][1],
                   f"{r['params'] / GIB:.3f}",
                   f"{r['state'] / GIB:.3f} ({r['state'] - adam:+,} B)",
                   f"{r['argument'] / GIB:.3f}", f"{r['output'] / GIB:.3f}"])
  return _report.table(["size, devices", "optimizer", "params (GiB)",
                        "optimizer state (GiB; vs AdamW's)",
                        "arguments (GiB)", "outputs (GiB)"], rows)


def compile_table(data) -> str:
  """The compiles: seconds (median and largest over the variants of each
  size and device count) and the compiling process's peak resident set
  (Python, JAX and XLA included)."""
  rows = []
  for size, n in _groups(data):
    g = data["results"][size][str(n)]
    secs = sorted(r["compile_s"] for r in g.values())
    peak = max(r["compile_peak_rss"] for r in g.values())
    rows.append([_group_label(size, n), str(len(secs)),
                 f"{secs[len(secs) // 2]:.1f} / {secs[-1]:.1f}",
                 f"{peak / GIB:.2f}"])
  return _report.table(["size, devices", "compiles",
                        "seconds (median / largest)",
                        "peak resident memory while compiling (GiB)"], rows)


def values(data) -> dict:
  """Numbers quoted in the prose: ``<variant>:<size>:<devices>`` the ratio
  of temporary bytes over AdamW's (same model settings), ``work:...`` of
  temporary plus output bytes, ``gib:...`` the temporary GiB;
  ``outputs:<size>:<devices>`` AdamW's output GiB, ``params:...`` the
  params' GiB per device, ``buffers:<variant>:<size>:1`` what a memory
  setting needs beyond AdamW's on one device, in multiples of the params'
  bytes; at each swept batch the same ratios,
  ``<variant>:<size>:<devices>:<sequences per device>`` and ``work:...``,
  and ``workgib:...`` the temporary plus output GiB; ``minutes`` the
  run's total."""
  out = {"minutes": f"{data['seconds'] / 60:.0f}"}
  for size, n in _groups(data):
    g = data["results"][size][str(n)]
    for name in g:
      out[f"{name}:{size}:{n}"] = f"{_over_adamw(g, name):.2f}"
      out[f"work:{name}:{size}:{n}"] = f"{_over_adamw(g, name, 'work'):.2f}"
      out[f"gib:{name}:{size}:{n}"] = f"{g[name]['temp'] / GIB:.2f}"
    out[f"outputs:{size}:{n}"] = f"{g['adamw']['output'] / GIB:.2f}"
    out[f"params:{size}:{n}"] = f"{g['adamw']['params'] / GIB:.2f}"
    if n == 1:  # sharded, a sequence's activations outweigh the params
      for name in SWEPT.values():
        out[f"buffers:{name}:{size}:{n}"] = (
            f"{_extra_buffers(g, name):.2f}")
    for per in data["sweep_per_device"]:
      s = _sweep_group(data, size, n, per)
      for name in s:
        out[f"{name}:{size}:{n}:{per}"] = f"{_over_adamw(s, name):.2f}"
        out[f"work:{name}:{size}:{n}:{per}"] = (
            f"{_over_adamw(s, name, 'work'):.2f}")
        out[f"workgib:{name}:{size}:{n}:{per}"] = (
            f"{_bytes(s[name], 'work') / GIB:.2f}")
  return out


def checks(data) -> list:
  items = []
  for size, n in _groups(data):
    g = data["results"][size][str(n)]
    where = _group_label(size, n)
    for per in data["sweep_per_device"]:
      s = _sweep_group(data, size, n, per)
      at = (where if per == data["per_device"]
            else f"{where}, {per} sequences per device")
      for optimizer, name in RECOMMENDED.items():
        target = 1.0 if optimizer == "AdaHessian" else 1.1
        temp, work = _over_adamw(s, name), _over_adamw(s, name, "work")
        items.append((f"{at}: {optimizer} ({name}) {temp:.2f}x AdamW's "
                      f"temporary bytes, {work:.2f}x with the outputs "
                      f"(target <= {target})", max(temp, work) <= target))
    for key in ("adahessian", "gnb", "sophia"):
      diff = g[key]["state"] - g["adamw"]["state"]
      items.append((f"{where}: {VARIANTS[key][1]} state = AdamW's "
                    f"{diff:+} bytes", 0 <= diff <= 64))
  return items


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default=",".join(SIZES))
  parser.add_argument("--devices", default=",".join(map(str, DEVICES)))
  parser.add_argument("--quick", action="store_true",
                      help="the mini configuration only")
  parser.add_argument("--json", default=None)
  parser.add_argument("--worker", nargs=3, default=None,
                      metavar=("SIZE", "DEVICES", "OUT"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--sweep-worker", nargs=3, default=None,
                      metavar=("SIZE", "DEVICES", "OUT"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker or args.sweep_worker:
    size, devices, path = args.worker or args.sweep_worker
    measure = measure_group if args.worker else measure_sweep
    result = measure(size, int(devices))
    _report.save_json(path, result, announce=False)
    return result
  from examples import gpt  # pylint: disable=import-outside-toplevel
  sizes = ["mini"] if args.quick else args.sizes.split(",")
  devices = [int(n) for n in args.devices.split(",")]
  start = time.perf_counter()
  results, sweep = {}, {}
  for size in sizes:
    for n in devices:
      print(f"{size} on {n} device(s):", flush=True)
      results.setdefault(size, {})[str(n)] = run_group(size, n)
      print(f"{size} on {n} device(s), more sequences per device:",
            flush=True)
      sweep.setdefault(size, {})[str(n)] = run_group(size, n, sweep=True)
  data = {"sizes": sizes, "devices": devices, "per_device": PER_DEVICE,
          "seq_len": {s: min(SEQ_LEN, gpt.CONFIGS[s].context) for s in sizes},
          "vocab_size": {s: gpt.CONFIGS[s].vocab_size for s in sizes},
          "parameters": {s: gpt.param_count(gpt.build(
              gpt.CONFIGS[s], abstract=True)[1]) for s in sizes},
          "chunks": CHUNKS,
          "stride": STRIDE, "interval": INTERVAL,
          "seconds": round(time.perf_counter() - start),
          "quick": args.quick, "results": results,
          "sweep_per_device": list(SWEEP), "sweep": sweep}
  _report.save_json(args.json, data)
  print("\n### Temporary bytes per device over AdamW's (same model "
        "settings); GiB in brackets\n\n" + memory_table(data))
  print("\n### Temporary plus output bytes, the same way\n\n"
        + work_table(data))
  print("\n### Temporary plus output bytes over AdamW's step without "
        "remat\n\n" + default_table(data))
  print("\n### The recommended settings over AdamW's, remat, by sequences "
        "per device\n\n" + sweep_table(data))
  print("\n### State, arguments and outputs per device\n\n"
        + state_table(data))
  print("\n### The compiles\n\n" + compile_table(data))
  print("\n### Goals\n\n" + _report.checklist(checks(data)))
  print(f"\n{data['seconds'] / 60:.1f} minutes in all")
  return data


if __name__ == "__main__":
  main()
