"""docs/scaling.md's Python blocks run as written (those that can run here), as tests/test_docs.py
runs the other pages'."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_docs import blocks

ROOT = Path(__file__).resolve().parents[2]


def test_every_python_block_of_the_scaling_page_runs() -> None:
    code = "\n".join(blocks(ROOT / "docs" / "scaling.md"))
    assert code.strip(), "docs/scaling.md has no runnable Python block"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
