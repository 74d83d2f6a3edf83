"""The ASGI app fuzzed at length: 10,000 hypothesis-made requests (more with
``EMBSERVE_FUZZ_EXAMPLES``), none answered 5xx, left unanswered or hanging.

Minutes long, so it runs only when ``EMBSERVE_LONG_TESTS=1`` is set:
``EMBSERVE_LONG_TESTS=1 .venv/bin/python -m pytest tests/reliability/test_http_fuzz.py``.
``tests/test_asgi_fuzz.py`` runs the same fuzzer a few hundred times in the normal suite.
"""

from __future__ import annotations

import os

import pytest

from tests.http_inputs import check_app_survives


@pytest.mark.skipif(
    os.environ.get("EMBSERVE_LONG_TESTS") != "1", reason="long: set EMBSERVE_LONG_TESTS=1"
)
@pytest.mark.timeout(3600)
def test_ten_thousand_fuzzed_requests_find_no_5xx_and_no_hang() -> None:
    check_app_survives(max(10_000, int(os.environ.get("EMBSERVE_FUZZ_EXAMPLES", "0"))))
