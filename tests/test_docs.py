"""The docs' Python blocks run as written: each page's blocks in order, in one interpreter, as
a reader would paste them into one session. A block that cannot run here starts with
``# not run: <why>``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Pages whose every block runs (the others join as they are made runnable).
PAGES = [
    "docs/concepts.md",
    "docs/http.md",
    "docs/migrating-from-ray.md",
    "docs/operations.md",
    "docs/traffic.md",
]


def blocks(page: Path) -> list[str]:
    """The Python blocks of ``page``, in order, without those marked ``# not run``."""
    found = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    return [block for block in found if not block.lstrip().startswith("# not run")]


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_of_the_page_runs(page: str) -> None:
    code = "\n".join(blocks(ROOT / page))
    assert code.strip(), f"{page} has no Python block"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
