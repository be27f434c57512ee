"""Sphinx configuration for the lwrs documentation."""

import lwrs

project = "lwrs"
author = "the lwrs developers"
copyright = "2026, the lwrs developers"
release = lwrs.__version__
version = lwrs.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # copies the MathJax it bundles into _static/mathjax and points mathjax_path there: no CDN
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "myst_parser",  # the changelog and the README's extras table are included from Markdown
]
myst_heading_anchors = 2

autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

nitpicky = False
html_theme = "furo"
html_title = f"lwrs {release}"
exclude_patterns = ["_build", "**.md"]  # Markdown is only included (changelog, extras), never a page
html_static_path = ["_static"]
html_css_files = ["lwrs.css"]  # code, tables and math stay inside the page width


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented in their class's Attributes section; skip autodoc's 'Alias for field' stubs."""
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number"):
        return True
    return skip


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
