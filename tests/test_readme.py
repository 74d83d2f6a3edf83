"""The README keeps its promises: the two commands, a short example with its output shown (the
docs test runs it, see tests/test_docs.py), and a link to every page of the docs."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_docs import python_blocks_of

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_the_twenty_line_example_is_short_and_shows_its_output() -> None:
    section = README.read_text().split("## In twenty lines", 1)[1].split("\n## ", 1)[0]
    example = python_blocks_of(section)[0]
    assert len(example.code.strip().splitlines()) <= 22
    assert example.shown == "0.3333333333333333\n"


def test_the_two_commands_are_make_targets() -> None:
    text = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    for command in ("make demo", "make test"):
        assert command in text
        assert re.search(rf"^{command.split()[1]}:", makefile, re.M), command


def test_every_docs_page_is_linked_and_every_link_resolves() -> None:
    text = README.read_text()
    links = set(re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text))
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} - {"docs/index.md"}
    assert pages <= links, f"not linked from the README: {sorted(pages - links)}"


def test_every_example_the_readme_names_exists() -> None:
    section = README.read_text().split("holds services to start from", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(\w+\.py)`", section)
    assert len(named) >= 8
    for name in named:
        assert (ROOT / "examples" / name).is_file(), name
