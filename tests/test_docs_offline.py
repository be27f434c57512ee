"""The built documentation works without a network: no script, style, font or image from another host.

Large-batch training runs on air-gapped clusters; the docs must render their math there. The whole
site is built (a few seconds) and every HTML page's resources are checked to be local files.
"""

from __future__ import annotations

import html.parser
import os
import pathlib
import subprocess
import sys
import urllib.parse

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("furo")
ROOT = pathlib.Path(__file__).resolve().parent.parent


class _Resources(html.parser.HTMLParser):
    """Collects what a browser loads by itself: scripts, stylesheets, icons, images, frames."""

    def __init__(self):
        super().__init__()
        self.loaded: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in {"script", "img", "iframe", "source", "embed"} and attrs.get("src"):
            self.loaded.append(attrs["src"])
        if tag == "link" and attrs.get("href") and set((attrs.get("rel") or "").split()) - {"index", "search",
                                                                                          "next", "prev"}:
            self.loaded.append(attrs["href"])


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("html")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "html", "-d", str(out / ".doctrees"), str(ROOT / "docs"),
                    str(out)], check=True, env=env, timeout=600)
    return out


def test_every_page_loads_only_local_files(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 5
    for page in pages:
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8"))
        for ref in parser.loaded:
            url = urllib.parse.urlsplit(ref)
            assert not url.scheme and not url.netloc, f"{page.relative_to(site)} loads {ref} from another host"
            if url.path:
                assert (page.parent / urllib.parse.unquote(url.path)).resolve().is_file(), f"{page.name}: {ref} missing"


def test_stylesheets_import_nothing_from_another_host(site):
    for sheet in site.rglob("*.css"):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        for marker in ("url(http", "url('http", 'url("http', "url(//", "@import \"http", "@import url(http"):
            assert marker not in text, f"{sheet.relative_to(site)}: {marker}"


def test_math_pages_load_the_bundled_mathjax_and_its_fonts(site):
    theory = (site / "theory.html").read_text(encoding="utf-8")
    assert 'class="math' in theory, "the theory page has math"
    parser = _Resources()
    parser.feed(theory)
    (mathjax,) = [ref for ref in parser.loaded if "mathjax" in ref.lower()]
    script = site / mathjax
    assert script.is_file() and script.stat().st_size > 100_000, "MathJax itself, not a loader that fetches it"
    assert any((script.parent / "output" / "chtml" / "fonts").rglob("*.woff")), "MathJax's fonts are bundled"


def test_the_changelog_and_the_extras_table_are_in_the_site(site):
    """docs/changelog.rst includes CHANGELOG.md, and the quick start the README's extras table."""
    import tomllib

    changelog = (site / "changelog.html").read_text(encoding="utf-8")
    assert "0.2.0 (unreleased)" in changelog
    bullets = [line for line in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines() if line.startswith("- ")]
    assert bullets and changelog.count("<li>") >= len(bullets)
    quickstart = (site / "quickstart.html").read_text(encoding="utf-8")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    table = quickstart.split("What each extra installs", 1)[1].split("</table>", 1)[0]
    for extra in extras:
        assert f"<span class=\"pre\">{extra}</span>" in table, extra
