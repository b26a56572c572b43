"""Sphinx configuration: API reference from the docstrings, and the README's guides (MyST).

Build (CI runs it with warnings as errors): `python -m sphinx -W --keep-going -b html docs
docs/_build/html`, after `pip install -e ".[docs]"`.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "lbcl_jax"
author = "lbcl_jax authors"
copyright = "2024, lbcl_jax authors"  # noqa: A001  # pylint: disable=redefined-builtin

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
# Docstrings quote code in single backticks (Google style, as in the rest of the code base).
default_role = "code"

# Google-style docstrings (Args:, Returns:, Raises:, Examples:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Attributes as fields of their class, not as second descriptions of a dataclass's fields.
napoleon_use_ivar = True

# The guides are the repository's Markdown files, included as they are.
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = "lbcl_jax"


_SINGLE_BACKTICKS = re.compile(r"(?<![`:\w])`([^`\n]+)`(?![`\w])")


def _double_backticks(app, what, name, obj, options, lines):
  """`x` -> ``x`` in docstrings, before napoleon reads them.

  The code base quotes code in single backticks (rendered as code by `default_role`), but
  napoleon splits a Returns line at its first colon unless the colon is inside ``...``, and
  `{path: [K, r]}` has one.
  """
  del app, what, name, obj, options
  lines[:] = [_SINGLE_BACKTICKS.sub(r"``\1``", line) for line in lines]


def setup(app):
  app.connect("autodoc-process-docstring", _double_backticks, priority=100)  # napoleon: 500
