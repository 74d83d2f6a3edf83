"""The docs' Python blocks run as written, and print what the page shows.

Each page (README.md and every docs/*.md) runs its ```python blocks in order in one fresh
interpreter, in an empty temporary directory, as a reader pasting them into one session would.
A block that cannot run here starts with ``# not run: <why>``; such blocks stay under a tenth
of all. What a block prints is shown in the ```text block that comes right after it, and must
match (``...`` in a shown line stands for any text, as doctest's ELLIPSIS); a block with no
```text block after it must print nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The site's home and the API reference (generated from docstrings) hold no Python blocks.
NO_CODE = {"docs/index.md", "docs/api.md"}
PAGES = [
    "README.md",
    *sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "docs").glob("*.md")
        if str(p.relative_to(ROOT)) not in NO_CODE
    ),
]
NOT_RUN = "# not run:"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.S | re.M)
# Printed between blocks so that the output can be cut back into each block's share.
MARK = "\x1eembserve-docs-block"


@dataclass
class Block:
    """One ```python block of a page, with the output the page shows for it."""

    line: int
    code: str
    shown: str | None

    @property
    def runs(self) -> bool:
        return not self.code.lstrip().startswith(NOT_RUN)


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of ``page`` in order, each with the ```text block right after it."""
    return python_blocks_of(page.read_text())


def python_blocks_of(text: str) -> list[Block]:
    """The ```python blocks of a page's ``text``, as :func:`python_blocks`."""
    fences = list(FENCE.finditer(text))
    found = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        after = fences[i + 1] if i + 1 < len(fences) else None
        shown = None
        # Only blank lines may stand between a block and its output.
        if after and after.group(1) == "text" and not text[fence.end() : after.start()].strip():
            shown = after.group(2)
        found.append(Block(text.count("\n", 0, fence.start()) + 1, fence.group(2), shown))
    return found


def matches(shown: str, printed: str) -> bool:
    """Whether ``printed`` is what ``shown`` shows, ``...`` standing for any text."""
    pattern = ".*?".join(re.escape(part) for part in shown.rstrip().split("..."))
    return re.fullmatch(pattern, printed.rstrip(), re.S) is not None


def run_page(page: str) -> tuple[list[Block], list[str]]:
    """Run the page's blocks in one interpreter; return them with what each printed."""
    runnable = [block for block in python_blocks(ROOT / page) if block.runs]
    program = "".join(f"print({MARK!r}, flush=True)\n{block.code}\n" for block in runnable)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
            env=env,
        )
    assert result.returncode == 0, f"{page}:\n{result.stderr[-2500:]}"
    printed = result.stdout.split(MARK + "\n")[1:]
    assert len(printed) == len(runnable), result.stdout[-2000:]
    return runnable, printed


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_of_the_page_runs_and_prints_what_it_shows(page: str) -> None:
    runnable, printed = run_page(page)
    assert runnable, f"{page} has no Python block that runs"
    for block, output in zip(runnable, printed, strict=True):
        where = f"{page}:{block.line}"
        if block.shown is None:
            assert not output.strip(), f"{where} prints this but shows no ```text block:\n{output}"
        else:
            assert matches(block.shown, output), (
                f"{where} shows:\n{block.shown}\nbut printed:\n{output}"
            )


def test_blocks_that_do_not_run_are_few_and_say_why() -> None:
    every = [block for page in PAGES for block in python_blocks(ROOT / page)]
    skipped = [block for block in every if not block.runs]
    for block in skipped:
        why = block.code.lstrip()[len(NOT_RUN) :].split("\n", 1)[0]
        assert why.strip(), f"a `# not run:` block at line {block.line} says not why"
    assert len(skipped) * 10 < len(every), f"{len(skipped)} of {len(every)} blocks do not run"


def test_a_page_that_prints_without_showing_it_fails() -> None:
    # The checker itself: a shown output that differs, or output not shown, is caught.
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.md"
        page.write_text(
            "```python\nprint(1)\n```\n\n```text\n1\n```\n\n```python\nx = 2\n```\n"
            "```python\nprint('id-42: hi')\n```\n```text\nid-...: hi\n```\n"
        )
        blocks = python_blocks(page)
    assert [block.shown for block in blocks] == ["1\n", None, "id-...: hi\n"]
    assert matches("id-...: hi\n", "id-42: hi\n")
    assert not matches("1\n", "2\n")
    assert not matches("id-...: hi", "id-42: ho")
