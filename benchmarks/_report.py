"""Reporting: compiled-program facts, Markdown tables, plots and JSON."""

import json
import os
import re

TOLERANCE = 1.05


def fmt(x, nd=2) -> str:
  return "—" if x is None else f"{x:.{nd}f}"


def mark(value, target) -> str:
  """`value` formatted, with ✗ when it exceeds `target`."""
  return fmt(value) + ("" if value <= target else " ✗")


def table(header: list, rows: list) -> str:
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


def save_json(path, payload) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def figure_saver(image_dir, tag):
  """`save(fig, stem)` writing `<image_dir>/<stem><tag>.png`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(image_dir, exist_ok=True)

  def save(fig, stem):
    fig.tight_layout()
    path = os.path.join(image_dir, f"{stem}{tag}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
  return plt, save
