"""The one report writer of the benchmarks: Markdown tables, JSON, plots.

Also the facts of a compiled program (memory, heavy operations) that the
speed suite reports.
"""

import json
import math
import os
import re

TOLERANCE = 1.05


def fmt(x, nd=2) -> str:
  return "—" if x is None else f"{x:.{nd}f}"


def mark(value, target) -> str:
  """`value` formatted, with ✗ when it exceeds `target`."""
  return fmt(value) + ("" if value <= target else " ✗")


def table(header: list, rows: list) -> str:
  """A Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def heavy_ops(compiled_text: str) -> int:
  """Matmuls and convolutions in optimized HLO (fused ones included)."""
  return (len(re.findall(r"\bdot\(", compiled_text))
          + len(re.findall(r"\bconvolution\(", compiled_text)))


def compiled_report(lowered) -> dict:
  """Memory (XLA's memory_analysis) and heavy-op count of a program."""
  compiled = lowered.compile()
  m = compiled.memory_analysis()
  out = {"heavy_ops": heavy_ops(compiled.as_text()),
         "temp": int(m.temp_size_in_bytes),
         "argument": int(m.argument_size_in_bytes),
         "output": int(m.output_size_in_bytes)}
  out["temp+argument"] = out["temp"] + out["argument"]
  return out


def checklist(items: list) -> str:
  """`- [x] text` lines for (text, ok) pairs; misses flagged."""
  return "\n".join(f"- [{'x' if ok else ' '}] {text}"
                   + ("" if ok else "  <-- MISSED") for text, ok in items)


def finite_json(x):
  """`x` with NaN and infinities as strings (JSON has none)."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: finite_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite_json(v) for v in x]
  return x


def save_json(path, payload, indent=1, announce=True) -> None:
  """Writes `payload` to `path` (if given) whole or not at all."""
  if not path:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(finite_json(payload), f, indent=indent)
  os.replace(path + ".tmp", path)
  if announce:
    print(f"wrote {path}")


def pyplot():
  """matplotlib's pyplot, drawing to files only."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save_figure(fig, path, dpi=110) -> str:
  """Writes `fig` to `path` and closes it."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


def figure_saver(image_dir, tag):
  """`save(fig, stem)` writing `<image_dir>/<stem><tag>.png`."""
  def save(fig, stem):
    path = save_figure(fig, os.path.join(image_dir, f"{stem}{tag}.png"))
    print(f"wrote {path}")
  return pyplot(), save
