"""Every Python code block of the documentation and the README runs, as written.

The blocks are found by Sybil's parsers: ``.. code-block:: python`` (and ``code``,
``sourcecode``, the ``python3``/``py`` aliases), doctest ``>>>`` paragraphs, bare ``::``
literal blocks (Python unless the page's ``.. highlight::`` says otherwise) and the README's
fenced ```` ```python ```` blocks. The blocks of one page run in order in one namespace, in a
temporary working directory. Every page under ``docs/`` is covered, including pages added later.

A block that is deliberately not Python (a shell command, a config file, output) says so by its
language; a test checks that every block's language is one of the known ones, so a typo such as
``pyhton`` cannot silently skip a block. A page whose block imports an optional library (torch,
jax, ...) that is not installed is skipped; any other error fails.
"""

from __future__ import annotations

import doctest
import pathlib
import re

import pytest

pytest.importorskip("sybil")
from sybil import Document  # noqa: E402
from sybil.evaluators.python import PythonEvaluator  # noqa: E402
from sybil.parsers import markdown, rest  # noqa: E402
from sybil.parsers.abstract.lexers import BlockLexer  # noqa: E402
from sybil.parsers.rest.lexers import END_PATTERN_TEMPLATE  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.rst") if "_build" not in p.relative_to(ROOT / "docs").parts)
DOCUMENTS = [*PAGES, ROOT / "README.md"]

PYTHON = ("python", "python3", "py")
NOT_RUN = {"bash", "sh", "shell", "console", "shell-session", "text", "none", "output", "toml", "ini", "cfg", "yaml",
           "json", "cpp", "c++", "c", "diff", "default", "pycon-output", "rst", "markdown", "md"}
# optional libraries (the extras and the peers): a page that needs one that is not installed is skipped
OPTIONAL = {"torch", "jax", "jaxlib", "optax", "cupy", "timm", "pytorch_optimizer", "opacus", "mnist1d", "sklearn",
            "matplotlib", "tqdm", "torchvision", "apex", "flax", "array_api_strict"}

_LITERAL_START = re.compile(r"^(?P<prefix>[ \t]*)(?!\.\.)(?:[^\n]*\S)?::[ \t]*\n(?=[ \t]*\n)", re.MULTILINE)
_HIGHLIGHT = re.compile(r"^\.\. highlight::[ \t]*(\S+)", re.MULTILINE)
_DIRECTIVE_LANGUAGE = re.compile(r"^[ \t]*\.\. (?:code-block|code|sourcecode)::[ \t]*(\S*)", re.MULTILINE)
_FENCE_LANGUAGE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)", re.MULTILINE)


class LiteralBlockLexer(BlockLexer):
    """ReST's bare ``::`` literal blocks; their language is the page's ``.. highlight::`` (default Python)."""

    def __init__(self):
        super().__init__(_LITERAL_START, END_PATTERN_TEMPLATE)

    def __call__(self, document: Document):
        for region in super().__call__(document):
            highlights = _HIGHLIGHT.findall(document.text, 0, region.start)
            region.lexemes["arguments"] = highlights[-1] if highlights else "python"
            region.lexemes["source"] = region.lexemes["source"].strip_leading_newlines()
            yield region


class LiteralBlockParser(rest.CodeBlockParser):
    def __init__(self):
        super().__init__(language="python", evaluator=PythonEvaluator())
        self.lexers.append(LiteralBlockLexer())
        del self.lexers[:2]  # only the literal-block lexer: directives are parsed by the other parsers


def _parsers(path: pathlib.Path) -> list:
    if path.suffix == ".md":
        return [markdown.CodeBlockParser(language, PythonEvaluator()) for language in PYTHON]
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    return [*(rest.CodeBlockParser(language, PythonEvaluator()) for language in PYTHON),
            LiteralBlockParser(), rest.DocTestParser(optionflags=flags)]


def _languages(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return _FENCE_LANGUAGE.findall(text)[::2]  # opening fences only
    return _DIRECTIVE_LANGUAGE.findall(text)


def _id(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", DOCUMENTS, ids=_id)
def test_every_code_block_names_a_known_language(path):
    for language in _languages(path):
        assert language in PYTHON or language in NOT_RUN, (
            f"{_id(path)}: a block in language {language!r}: Python blocks are run, others must name their language"
            f" ({sorted(NOT_RUN)})")


@pytest.mark.parametrize("path", DOCUMENTS, ids=_id)
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    document = Document.parse(str(path), *_parsers(path))
    examples = list(document.examples())
    for example in examples:
        try:
            example.evaluate()
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] in OPTIONAL:
                pytest.skip(f"{_id(path)} line {example.line} needs {error.name}, not installed")
            raise AssertionError(f"{_id(path)}, the block at line {example.line}: {error!r}") from error
        except Exception as error:
            raise AssertionError(f"{_id(path)}, the block at line {example.line}: {error!r}") from error


def test_the_parsers_find_the_blocks_we_know_of():
    """A check of the extraction itself: the README's and the quick start's Python blocks are all found."""
    readme = Document.parse(str(ROOT / "README.md"), *_parsers(ROOT / "README.md"))
    assert len(list(readme.examples())) == (ROOT / "README.md").read_text().count("```python\n") >= 3
    quickstart = ROOT / "docs" / "quickstart.rst"
    found = list(Document.parse(str(quickstart), *_parsers(quickstart)).examples())
    assert len(found) == quickstart.read_text().count(".. code-block:: python") >= 2


def test_a_bare_literal_block_is_python_and_runs(tmp_path):
    page = tmp_path / "page.rst"
    page.write_text("Text::\n\n   x = 1 + 1\n   assert x == 2\n\nMore text.\n\n.. highlight:: bash\n\nShell::\n\n"
                    "   echo not python\n\n>>> 6 * 7\n42\n")
    document = Document.parse(str(page), *_parsers(page))
    examples = list(document.examples())
    assert len(examples) == 2  # the Python literal block and the doctest; the shell block is not Python
    for example in examples:
        example.evaluate()
    assert document.namespace["x"] == 2
    page.write_text("Text::\n\n   raise ValueError('this block fails')\n")
    (example,) = Document.parse(str(page), *_parsers(page)).examples()
    with pytest.raises(ValueError, match="this block fails"):
        example.evaluate()




# 88 characters of furo's code font fit the text column (about 736 px); longer lines wrap.
MAX_CODE_LINE = 88


@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_code_lines_fit_the_page(path):
    """Code in the docs fits the column without wrapping (the CSS wraps what is longer, less readably)."""
    document = Document.parse(str(path), *_parsers(path))
    for example in document.examples():
        source = getattr(example.parsed, "source", str(example.parsed))
        for offset, line in enumerate(source.splitlines()):
            assert len(line) <= MAX_CODE_LINE, f"{_id(path)} line {example.line + offset}: {len(line)} characters"
