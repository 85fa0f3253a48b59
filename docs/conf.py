"""Sphinx configuration of the adahessian-optax documentation."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "_ext"))
sys.path.insert(0, os.path.dirname(_HERE))  # the package, without installing

import adahessian_optax  # noqa: E402  pylint: disable=wrong-import-position

project = "adahessian-optax"
author = "adahessian-optax contributors"
copyright = "2025, adahessian-optax contributors"  # pylint: disable=redefined-builtin
release = adahessian_optax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax served from the build's own _static/mathjax (the package ships
    # it), so that the math renders offline; it sets mathjax_path.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "aho_api",
]

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# MyST
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

# autodoc / napoleon (Google style, as in optax)
aho_api_package = "adahessian_optax"
autosummary_generate = False
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False
default_role = "code"  # `x` in docstrings renders as code, as in Markdown
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
napoleon_attr_annotations = False

# HTML
html_theme = "furo"
html_title = f"adahessian-optax {release}"
html_static_path = []
pygments_style = "sphinx"
pygments_dark_style = "monokai"
