"""The ASGI app called directly with hypothesis-made requests: no 5xx, no hang, none unanswered.

A few hundred examples here; ``tests/reliability/test_http_fuzz.py`` runs 10,000 and more.
"""

from __future__ import annotations

from tests.http_inputs import check_app_survives


def test_the_app_answers_every_fuzzed_request_without_5xx_or_hang() -> None:
    check_app_survives(300)
