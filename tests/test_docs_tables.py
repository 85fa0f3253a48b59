"""Every results table of the README and the docs is its results file's.

A fenced table (``<!-- table: module:function results.json -->`` ...
``<!-- /table -->``, see ``benchmarks/common/tables.py``) must be exactly
what its function renders from its results file, a quoted value
(``<!-- value: ... -->``) exactly its file's, and every other Markdown
table must be marked as not a result. ``python -m benchmarks.common.tables
--write`` rewrites the fenced tables after a script has rewritten a file.
"""

import json
import os
import textwrap

import pytest

from benchmarks.common import tables

DOCS = tables.documents()


def _fences():
  out = []
  for doc in DOCS:
    with open(os.path.join(tables.ROOT, doc), encoding="utf-8") as f:
      out += tables.parse(doc, f.read())[0]
  return out


def _values():
  out = []
  for doc in DOCS:
    with open(os.path.join(tables.ROOT, doc), encoding="utf-8") as f:
      out += tables.values(doc, f.read())
  return out


@pytest.mark.parametrize("fence", _fences(), ids=lambda f: f.name)
def test_table_is_its_results_file(fence):
  problems = tables.fence_problems(fence)
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("value", _values(), ids=lambda v: v.name)
def test_value_is_its_results_file(value):
  assert value.text == tables.render_value(value), (
      f"{value.name}: the text says {value.text!r}; run python -m "
      "benchmarks.common.tables --write")


@pytest.mark.parametrize("doc", DOCS)
def test_every_table_is_fenced_or_not_a_result(doc):
  with open(os.path.join(tables.ROOT, doc), encoding="utf-8") as f:
    _, unfenced, malformed = tables.parse(doc, f.read())
  assert not malformed, "\n".join(malformed)
  if doc in tables.PENDING:
    problems = tables.pending_problems(doc, unfenced)
    assert not problems, problems[0]
    return
  assert not unfenced, (
      f"{doc}: tables not rendered from a results file (fence them, or mark "
      "one that is not a result with <!-- table: none (not a result) -->):\n"
      + "\n".join(f"  line {line}: {header}" for line, header in unfenced))


def test_every_results_file_is_used():
  """A results file under docs/results that no table or value reads is
  either stale or a table that was dropped."""
  used = {f.path for f in _fences()} | {v.path for v in _values()}
  folder = os.path.join(tables.ROOT, "docs", "results")
  files = {f"docs/results/{name}" for name in os.listdir(folder)
           if name.endswith(".json")} if os.path.isdir(folder) else set()
  assert not files - used, sorted(files - used)


# The checker itself, on a small repository of its own.

_MODULE = '''
def render(data):
  return "| a | b |\\n|---|---|\\n" + "\\n".join(
      f"| {r['a']} | {r['b']} |" for r in data["rows"])

def numbers(data):
  return {"first a": str(data["rows"][0]["a"])}
'''


@pytest.fixture
def repo(tmp_path, monkeypatch):
  (tmp_path / "docs" / "results").mkdir(parents=True)
  (tmp_path / "fake_tables_module.py").write_text(_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  (tmp_path / "docs" / "results" / "r.json").write_text(json.dumps(
      {"rows": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]}))
  return tmp_path


def _write(path, text):
  path.write_text(textwrap.dedent(text).lstrip("\n"))


def test_checker_finds_a_stale_table_and_rewrites_it(repo):
  _write(repo / "README.md", """
      Some text; the first a is
      <!-- value: fake_tables_module:numbers docs/results/r.json first a -->7<!-- /value -->.

      <!-- table: fake_tables_module:render docs/results/r.json -->
      | a | b |
      |---|---|
      | 1 | 2 |
      | 3 | 5 |
      <!-- /table -->
      """)
  problems = tables.check(str(repo))
  assert len(problems) == 2
  assert "README.md:4 (fake_tables_module:render docs/results/r.json)" in (
      problems[0])
  assert "-| 3 | 5 |" in problems[0] and "+| 3 | 4 |" in problems[0]
  assert "'7'" in problems[1] and "'1'" in problems[1]
  assert tables.write(str(repo)) == ["README.md"]
  assert tables.check(str(repo)) == []
  text = (repo / "README.md").read_text()
  assert "| 3 | 4 |" in text and "r.json first a -->1<!-- /value -->" in text


def test_checker_finds_unfenced_tables_not_marked_or_in_code(repo):
  _write(repo / "README.md", """
      | x | y |
      |---|---|
      | 1 | 2 |

      <!-- table: none (not a result: options) -->
      | option | meaning |
      |:---|---:|
      | a | b |

      ```
      | in | code |
      |---|---|
      ```

      A line that starts with a bar
      | but is not a table.
      """)
  (repo / "docs" / "page.md").write_text("| p | q |\n| --- | --- |\n")
  problems = tables.check(str(repo))
  assert len(problems) == 2, problems
  assert problems[0].startswith("README.md:1: a table not rendered")
  assert problems[1].startswith("docs/page.md:1: a table not rendered")


def test_checker_reports_malformed_fences(repo):
  _write(repo / "README.md", """
      <!-- table: fake_tables_module:render docs/results/r.json -->
      | a | b |
      """)
  assert tables.check(str(repo)) == [
      "README.md:1: a table fence is never closed"]
