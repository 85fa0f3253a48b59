"""The README's and the docs' results tables, rendered from results files.

Every results table in ``README.md`` and ``docs/*.md`` is fenced with the
function that renders it and the results file it is rendered from (a path
from the repository root, written by a script)::

    <!-- table: examples.digits:results_table docs/results/digits.json -->
    | ... the rendered table ... |
    <!-- /table -->

``module:function`` takes the loaded JSON and returns the table's Markdown.
A table that is not a result (options, layouts, protocols) carries a marker
on the line just before it instead (or, in a document this project does not
annotate, an entry of ``NOT_RESULTS``)::

    <!-- table: none (not a result) -->

A number quoted in the prose can come from a results file the same way,
inline: ``<!-- value: module:function path key -->text<!-- /value -->``,
where ``function(data)`` returns a dict of strings and ``key`` picks one.

``python -m benchmarks.common.tables`` checks every fence, value and table
(exit status 1 on a difference); ``--write`` rewrites the fenced tables and
values from their files; ``--list`` lists every table and its source.
``tests/test_docs_tables.py`` runs the check.
"""

import argparse
import dataclasses
import difflib
import glob
import importlib
import json
import os
import re
import sys
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_OPEN = re.compile(r"^<!--\s*table:\s*(?P<spec>\S+)\s+(?P<path>\S+)\s*-->\s*$")
_CLOSE = re.compile(r"^<!--\s*/table\s*-->\s*$")
_NONE = re.compile(r"^<!--\s*table:\s*none\s*\(not a result[^)]*\)\s*-->\s*$")
_VALUE = re.compile(
    r"<!--\s*value:\s*(?P<spec>\S+)\s+(?P<path>\S+)\s+(?P<key>.+?)\s*-->"
    r"(?P<text>.*?)<!--\s*/value\s*-->", re.DOTALL)
# Tables that are not results, in documents whose text this project's
# check does not annotate: (document, the start of the table's header row).
NOT_RESULTS = (
    # The layouts' table, checked by tests/test_layouts.py, and the layout
    # conventions.
    ("docs/spatial_averaging.md", "| module | leaves | default |"),
    ("docs/spatial_averaging.md", "| layer | Flax / Keras layout |"),
)
# Documents whose results tables are yet to be fenced: the number of
# unfenced tables each may still hold. The check fails when a document holds
# more, and when it holds fewer (lower the number, or drop the entry, as
# tables are fenced). Empty: every results table is fenced.
PENDING: dict = {}
_CODE = re.compile(r"^\s*(```|~~~)")
_DELIMITER = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def documents(root: str = ROOT) -> list:
  """The Markdown files whose tables are checked, relative to `root`."""
  docs = sorted(os.path.relpath(p, root)
                for p in glob.glob(os.path.join(root, "docs", "*.md")))
  return ["README.md"] + docs


@dataclasses.dataclass
class Fence:
  """A fenced table: lines `start` (the opening comment) to `end` (the
  closing one), 0-based, of document `doc`."""

  doc: str
  start: int
  end: int
  spec: str
  path: str
  body: str

  @property
  def name(self) -> str:
    return f"{self.doc}:{self.start + 1} ({self.spec} {self.path})"


@dataclasses.dataclass
class Value:
  """An inline value: its span in the document's text."""

  doc: str
  line: int
  span: tuple  # of the text between the comments
  spec: str
  path: str
  key: str
  text: str

  @property
  def name(self) -> str:
    return f"{self.doc}:{self.line} (value {self.key!r} of {self.path})"


def _code_lines(lines: list) -> set:
  """Indices of the lines inside fenced code blocks (fences included)."""
  out, opened = set(), None
  for i, line in enumerate(lines):
    m = _CODE.match(line)
    if opened is None:
      if m:
        opened = re.match(r"\s*(`+|~+)", line).group(1)
        out.add(i)
      continue
    out.add(i)
    stripped = line.strip()
    if (stripped.startswith(opened)
        and stripped == stripped[0] * len(stripped)):
      opened = None
  return out


def parse(doc: str, text: str) -> tuple:
  """`(fences, unfenced, problems)` of one document's text: the fenced
  tables, the tables neither fenced nor marked ``none`` (as
  ``(line, header)``), and malformed fences."""
  lines = text.split("\n")
  code = _code_lines(lines)
  fences, unfenced, problems = [], [], []
  inside: Optional[tuple] = None
  for i, line in enumerate(lines):
    if i in code:
      continue
    opened = _OPEN.match(line)
    if opened and not _NONE.match(line):
      if inside:
        problems.append(f"{doc}:{i + 1}: a table fence opens inside the "
                        f"one opened at line {inside[0] + 1}")
      inside = (i, opened.group("spec"), opened.group("path"))
      continue
    if _CLOSE.match(line):
      if not inside:
        problems.append(f"{doc}:{i + 1}: <!-- /table --> closes nothing")
        continue
      start, spec, path = inside
      fences.append(Fence(doc, start, i, spec, path,
                          "\n".join(lines[start + 1:i])))
      inside = None
      continue
    starts_table = (line.lstrip().startswith("|") and i + 1 < len(lines)
                    and _DELIMITER.match(lines[i + 1])
                    and not (i > 0 and lines[i - 1].lstrip().startswith("|")))
    if starts_table and not inside:
      marked = i > 0 and _NONE.match(lines[i - 1])
      listed = any(doc == d and line.strip().startswith(h)
                   for d, h in NOT_RESULTS)
      if not (marked or listed):
        unfenced.append((i + 1, line.strip()))
  if inside:
    problems.append(f"{doc}:{inside[0] + 1}: a table fence is never closed")
  return fences, unfenced, problems


def values(doc: str, text: str) -> list:
  """The inline values of one document's text."""
  out = []
  for m in _VALUE.finditer(text):
    out.append(Value(doc, text.count("\n", 0, m.start()) + 1, m.span("text"),
                     m.group("spec"), m.group("path"),
                     " ".join(m.group("key").split()), m.group("text")))
  return out


def function(spec: str) -> Callable:
  """`module:function` imported (the repository root on the path)."""
  module, _, name = spec.partition(":")
  if not name:
    raise ValueError(f"{spec!r} is not module:function")
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  return getattr(importlib.import_module(module), name)


def load(path: str, root: str = ROOT):
  with open(os.path.join(root, path)) as f:
    return json.load(f)


def render(spec: str, path: str, root: str = ROOT) -> str:
  """The table that `spec` renders from the results file at `path`."""
  return function(spec)(load(path, root)).strip("\n")


def render_value(v: Value, root: str = ROOT) -> str:
  found = function(v.spec)(load(v.path, root))
  if v.key not in found:
    raise KeyError(f"{v.name}: {v.spec} has no value {v.key!r} "
                   f"(it has {sorted(found)})")
  return str(found[v.key])


def _read(doc: str, root: str) -> str:
  with open(os.path.join(root, doc), encoding="utf-8") as f:
    return f.read()


def check(root: str = ROOT) -> list:
  """Every difference between the docs and their results files, and every
  table that is neither fenced nor marked, as messages."""
  problems = []
  for doc in documents(root):
    text = _read(doc, root)
    fences, unfenced, malformed = parse(doc, text)
    problems += malformed
    problems += pending_problems(doc, unfenced)
    unfenced = [] if doc in PENDING else unfenced
    for line, header in unfenced:
      problems.append(
          f"{doc}:{line}: a table not rendered from a results file (fence "
          "it with <!-- table: module:function results.json --> ... "
          "<!-- /table -->, or mark a table that is not a result with "
          f"<!-- table: none (not a result) -->): {header[:80]}")
    for fence in fences:
      problems += _fence_problems(fence, root)
    for v in values(doc, text):
      try:
        expected = render_value(v, root)
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f"{v.name}: cannot render: {e!r}")
        continue
      if v.text != expected:
        problems.append(f"{v.name}: the text says {v.text!r}, its results "
                        f"file {expected!r}")
  return problems


def pending_problems(doc: str, unfenced: list) -> list:
  """For a document of `PENDING`: its unfenced tables against the number
  allowed."""
  if doc not in PENDING or len(unfenced) == PENDING[doc]:
    return []
  return [f"{doc}: {len(unfenced)} unfenced results tables where PENDING "
          f"allows {PENDING[doc]} (fence them, and lower the number in "
          "benchmarks/common/tables.py): "
          + "; ".join(f"line {line}" for line, _ in unfenced)]


def _fence_problems(fence: Fence, root: str) -> list:
  try:
    expected = render(fence.spec, fence.path, root)
  except Exception as e:  # pylint: disable=broad-except
    return [f"{fence.name}: cannot render: {e!r}"]
  if fence.body.strip("\n") == expected:
    return []
  diff = "\n".join(difflib.unified_diff(
      fence.body.strip("\n").split("\n"), expected.split("\n"),
      fromfile=f"{fence.doc} (as written)",
      tofile=f"{fence.path} (rendered)", lineterm=""))
  return [f"{fence.name}: the table differs from its results file "
          f"(python -m benchmarks.common.tables --write)\n{diff}"]


def fence_problems(fence: Fence, root: str = ROOT) -> list:
  """The differences of one fenced table from its rendering."""
  return _fence_problems(fence, root)


def write(root: str = ROOT, only: Optional[list] = None,
          skipped: Optional[list] = None) -> list:
  """Rewrites every fenced table and value from its results file (of the
  documents `only`, if given); returns the documents changed. A table or
  value whose results file does not exist yet is left as it is and named
  in `skipped` (the check still fails on it)."""
  skipped = [] if skipped is None else skipped
  changed = []
  for doc in documents(root):
    if only and doc not in only:
      continue
    text = _read(doc, root)
    new = text
    for v in reversed(values(doc, new)):
      if not os.path.exists(os.path.join(root, v.path)):
        skipped.append(f"{v.name}: no {v.path}")
        continue
      a, b = v.span
      new = new[:a] + render_value(v, root) + new[b:]
    fences, _, malformed = parse(doc, new)
    if malformed:
      raise SystemExit("\n".join(malformed))
    lines = new.split("\n")
    for fence in reversed(fences):
      if not os.path.exists(os.path.join(root, fence.path)):
        skipped.append(f"{fence.name}: no {fence.path}")
        continue
      lines[fence.start + 1:fence.end] = render(
          fence.spec, fence.path, root).split("\n")
    new = "\n".join(lines)
    if new != text:
      with open(os.path.join(root, doc), "w", encoding="utf-8") as f:
        f.write(new)
      changed.append(doc)
  return changed


def listing(root: str = ROOT) -> list:
  """`(document:line, source)` of every table: its renderer and results
  file, or that it is not a result."""
  out = []
  for doc in documents(root):
    text = _read(doc, root)
    lines = text.split("\n")
    fences, _, _ = parse(doc, text)
    for fence in fences:
      out.append((f"{doc}:{fence.start + 1}", f"{fence.spec} {fence.path}"))
    code = _code_lines(lines)
    for i, line in enumerate(lines):
      if i not in code and _NONE.match(line):
        out.append((f"{doc}:{i + 1}", "not a result"))
      elif i not in code and any(doc == d and line.strip().startswith(h)
                                 for d, h in NOT_RESULTS):
        out.append((f"{doc}:{i + 1}", "not a result (NOT_RESULTS)"))
    for line, _ in parse(doc, text)[1] if doc in PENDING else ():
      out.append((f"{doc}:{line}", "pending (PENDING): not yet fenced"))
  return sorted(out, key=lambda x: (x[0].split(":")[0],
                                    int(x[0].split(":")[1])))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--write", action="store_true",
                     help="rewrite the fenced tables and values from their "
                          "results files")
  group.add_argument("--list", action="store_true",
                     help="list every table and where it comes from")
  parser.add_argument("docs", nargs="*",
                      help="with --write: only these documents (paths from "
                           "the repository root)")
  args = parser.parse_args(argv)
  if args.write:
    skipped = []
    changed = write(only=args.docs, skipped=skipped)
    print("rewrote " + (", ".join(changed) if changed else "nothing"))
    for line in skipped:
      print(f"left as it is: {line}")
    return 0
  if args.list:
    for where, source in listing():
      print(f"{where}: {source}")
    return 0
  problems = check()
  print("\n\n".join(problems) if problems
        else "every table and value matches its results file")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
