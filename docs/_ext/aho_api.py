"""Generates the API reference from a package's ``__all__`` and checks it.

The ``aho-api`` directive (use it inside an ``{eval-rst}`` block in MyST
pages) documents every name of ``<package>.__all__``: one section per group,
each with an autosummary table followed by the autodoc entries. Its content
lines name the groups, in order, as ``Title: module[, module...]``; names
defined in a module that no line mentions get a section titled by the first
line of that module's docstring, so a new public module is documented without
editing the page.

After reading, the build fails (exit status 1, with or without ``-W``) when a
name of ``__all__`` was not documented by autodoc, does not exist, or has no
docstring of its own (a bare ``NamedTuple`` or dataclass gets a generated
one-line ``Name(field, ...)`` docstring, which does not count).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

_UNDERLINE = "-"


def _public(package: str) -> tuple[Any, list[str]]:
  module = importlib.import_module(package)
  names = getattr(module, "__all__", None)
  if names is None:
    raise ExtensionError(f"aho_api: {package} has no __all__")
  return module, list(names)


def _submodules(package: Any) -> list[str]:
  path = getattr(package, "__path__", None)
  if path is None:
    return []
  return [f"{package.__name__}.{info.name}"
          for info in pkgutil.iter_modules(path)]


def _attr_doc_module(package: Any, name: str) -> str | None:
  """The module holding a ``#:`` (or string) doc comment for data `name`."""
  for modname in [package.__name__, *_submodules(package)]:
    try:
      docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # pylint: disable=broad-except
      continue
    if ("", name) in docs and any(line.strip() for line in docs[("", name)]):
      return modname
  return None


def _home_module(package: Any, name: str, obj: Any) -> str | None:
  if inspect.isclass(obj) or inspect.isroutine(obj):
    return getattr(obj, "__module__", None)
  return _attr_doc_module(package, name)


def missing_docstring(package: Any, name: str, obj: Any) -> bool:
  """True when `obj` (exported as `name`) has no docstring of its own."""
  if inspect.isclass(obj):
    doc = obj.__dict__.get("__doc__")
    if not doc or not doc.strip():
      return True
    doc = doc.strip()
    # namedtuple and dataclass invent "Name(a, b)" / "Name(a: int)".
    return "\n" not in doc and doc.startswith(f"{obj.__name__}(")
  if inspect.isroutine(obj) or callable(obj):
    doc = getattr(obj, "__doc__", None)
    return not doc or not doc.strip()
  return _attr_doc_module(package, name) is None


def _module_title(modname: str) -> str:
  try:
    doc = inspect.getdoc(importlib.import_module(modname)) or ""
  except ImportError:
    doc = ""
  first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
  return first.rstrip(".") or modname


def _directive_for(obj: Any) -> tuple[str, list[str]]:
  if inspect.isclass(obj):
    options = [] if obj.__bases__ == (object,) else [":show-inheritance:"]
    if hasattr(obj, "_fields"):  # NamedTuple: fields are in "Attributes:".
      return "autoclass", options
    return "autoclass", [":members:", *options]
  if inspect.isroutine(obj):
    return "autofunction", []
  return "autodata", [":annotation:"]


class AhoApiDirective(SphinxDirective):
  """Documents every name of ``__all__``, grouped by defining module."""

  has_content = True
  required_arguments = 0
  optional_arguments = 0
  option_spec = {}

  def _groups(self) -> list[tuple[str, list[str]]]:
    groups = []
    for line in self.content:
      if not line.strip():
        continue
      title, sep, modules = line.partition(":")
      if not sep or not title.strip() or not modules.strip():
        raise self.error(
            f"aho-api: expected 'Title: module[, module]', got {line!r}")
      groups.append((title.strip(),
                     [m.strip() for m in modules.split(",") if m.strip()]))
    return groups

  def run(self) -> list[nodes.Node]:
    package_name = self.config.aho_api_package
    package, names = _public(package_name)
    self.env.note_dependency(inspect.getsourcefile(package))

    by_module: dict[str, list[str]] = {}
    for name in names:
      if not hasattr(package, name):
        continue  # reported by the consistency check
      home = _home_module(package, name, getattr(package, name)) or ""
      by_module.setdefault(home, []).append(name)

    sections: list[tuple[str, list[str]]] = []
    claimed: set[str] = set()
    for title, modules in self._groups():
      members = [n for m in modules for n in by_module.get(m, [])]
      claimed.update(modules)
      if members:
        sections.append((title, members))
    for home, members in by_module.items():
      if home not in claimed:
        sections.append((_module_title(home) if home else "Other", members))

    lines = [f".. currentmodule:: {package_name}", ""]
    documented = []
    for title, members in sections:
      # Functions first, then classes, then data; __all__ order within each.
      def rank(n):
        obj = getattr(package, n)
        return 0 if inspect.isroutine(obj) else 1 if inspect.isclass(obj) else 2
      members = sorted(members, key=rank)
      lines += [title, _UNDERLINE * len(title), "",
                ".. autosummary::", "   :nosignatures:", ""]
      lines += [f"   {n}" for n in members]
      lines.append("")
      for n in members:
        directive, options = _directive_for(getattr(package, n))
        lines.append(f".. {directive}:: {n}")
        lines += [f"   {o}" for o in options]
        lines.append("")
        documented.append(n)

    store = _store(self.env)
    store.setdefault(self.env.docname, set()).update(documented)

    node = nodes.section()
    node.document = self.state.document
    nested_parse_with_titles(
        self.state, StringList(lines, source=f"<aho-api {package_name}>"),
        node)
    return node.children


def _store(env) -> dict[str, set[str]]:
  if not hasattr(env, "aho_api_documented"):
    env.aho_api_documented = {}
  return env.aho_api_documented


def _record_autodoc(app, what, name, obj, options, lines):
  del what, obj, options
  if not hasattr(app.env, "aho_api_autodoc"):
    app.env.aho_api_autodoc = {}
  app.env.aho_api_autodoc.setdefault(app.env.docname, set()).add(name)


_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")


def _clean_signature(app, what, name, obj, options, signature, return_annotation):
  """Shows a class default as its dotted name, not ``<class '...'>``."""
  del app, what, name, obj, options
  if signature:
    signature = _CLASS_REPR.sub(r"\1", signature)
  return signature, return_annotation


def _purge(app, env, docname):
  del app
  _store(env).pop(docname, None)
  getattr(env, "aho_api_autodoc", {}).pop(docname, None)


def _merge(app, env, docnames, other):
  del app
  for docname in docnames:
    if docname in getattr(other, "aho_api_documented", {}):
      _store(env)[docname] = other.aho_api_documented[docname]
    if docname in getattr(other, "aho_api_autodoc", {}):
      if not hasattr(env, "aho_api_autodoc"):
        env.aho_api_autodoc = {}
      env.aho_api_autodoc[docname] = other.aho_api_autodoc[docname]


def _always_reread(app, env, added, changed, removed):
  # __all__ lives in __init__.py, which autodoc does not track; re-read the
  # pages of the reference on every build so that new names show up.
  del app, added, changed, removed
  return sorted(_store(env))


def _check(app: Sphinx, env) -> None:
  package_name = app.config.aho_api_package
  package, names = _public(package_name)
  autodoc_seen = set()
  for seen in getattr(env, "aho_api_autodoc", {}).values():
    autodoc_seen |= seen
  problems = []
  for name in names:
    full = f"{package_name}.{name}"
    if not hasattr(package, name):
      problems.append(f"{full} is in __all__ but does not exist")
      continue
    if full not in autodoc_seen:
      problems.append(
          f"{full} is in __all__ but autodoc did not document it (add it "
          "to the API reference)")
    if missing_docstring(package, name, getattr(package, name)):
      problems.append(f"{full} is public but has no docstring")
  for problem in problems:
    logger.error("undocumented public API: %s", problem)
  if problems:
    # Fails the build with or without -W; the pages are still written.
    app.statuscode = 1
    logger.error("%d public symbol(s) of %s.__all__ are undocumented",
                 len(problems), package_name)
    return
  logger.info("aho_api: all %d public symbols of %s are documented",
              len(names), package_name)


def setup(app: Sphinx) -> dict[str, Any]:
  app.add_config_value("aho_api_package", "", "env", types=(str,))
  app.add_directive("aho-api", AhoApiDirective)
  app.connect("autodoc-process-docstring", _record_autodoc)
  app.connect("autodoc-process-signature", _clean_signature)
  app.connect("env-purge-doc", _purge)
  app.connect("env-merge-info", _merge)
  app.connect("env-get-outdated", _always_reread)
  app.connect("env-check-consistency", _check)
  return {"version": "1.0", "parallel_read_safe": True,
          "parallel_write_safe": True, "env_version": 1}
