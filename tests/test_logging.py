"""Where embserve's records go when the application configured no logging: to stderr."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import urllib.error
import urllib.request

import embserve

@embserve.deployment
def broken(x):
    raise ValueError("the user's own failure")

@embserve.deployment
class Front:
    def __init__(self, broken):
        self.broken = broken

    async def __call__(self, request):
        return await self.broken.remote(1)

with embserve.Runtime() as rt:
    rt.run(Front.bind(broken.bind()), route_prefix="/front")
    server = rt.serve_http("127.0.0.1", 0)
    try:
        urllib.request.urlopen(server.url + "/front", data=b"1", timeout=10)
    except urllib.error.HTTPError as exc:
        print(exc.code)
    server.stop()
"""


def test_a_user_error_reaches_stderr_without_logging_configuration(tmp_path: Path) -> None:
    # Run apart: under pytest the root logger has handlers, so Python's last-resort
    # handler, the one that writes to stderr here, would never be used.
    script = tmp_path / "service.py"
    script.write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=45
    )
    assert (done.returncode, done.stdout) == (0, "500\n"), done.stderr
    assert "to 'Front' raised ValueError" in done.stderr
    assert 'service.py", line 9, in broken' in done.stderr
    assert "ValueError: the user's own failure" in done.stderr
