"""embserve_asgi/cli.py in-process: the start-up banner, its curl line, the help text.

The command itself, in real processes, is tested in tests/e2e/test_http_cli.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.requests import Request

import embserve
from embserve_asgi.app import App
from embserve_asgi.cli import _parser, _Plain, curl_hint, describe
from embserve_asgi.server import choose_server

URL = "http://127.0.0.1:8000"


@embserve.deployment
class Echo:
    """POST text, get it back: it says so with an example body."""

    http_methods = ("POST",)
    http_example = "it's here"

    async def __call__(self, request: Request) -> str:
        return (await request.body()).decode()


@embserve.deployment
class Clock:
    """Answers GET."""

    http_methods = ("GET",)

    def __call__(self, request: Request) -> str:
        return "12:00"


@embserve.deployment
class Predict:
    """Takes a JSON body that the CLI cannot guess."""

    http_methods = ("POST",)

    async def __call__(self, request: Request) -> dict[str, int]:
        return {"label": int((await request.json())["x"] > 0)}


@contextlib.asynccontextmanager
async def started(app: App) -> AsyncIterator[App]:
    """The App started, as ``embserve run`` starts it before it prints the banner."""
    await app.startup()
    try:
        yield app
    finally:
        await app.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("routes", "options", "hint"),
    [
        # An example body is sent as it is, quoted for the shell.
        ({"/echo": Echo, "/": Clock}, {}, f"curl -s -X POST {URL}/echo -d 'it'\"'\"'s here'"),
        ({"/clock": Clock, "/predict": Predict}, {}, f"curl -s {URL}/clock"),
        # Unsure how to call the route: the route table, with the token's header if guarded.
        ({"/predict": Predict}, {}, f"curl -s {URL}/-/routes"),
        (
            {"/predict": Predict},
            {"admin_token": "t"},
            f'curl -s -H "Authorization: Bearer $EMBSERVE_ADMIN_TOKEN" {URL}/-/routes',
        ),
        ({"/predict": Predict}, {"admin": False}, f"curl -s -X POST {URL}/predict"),
    ],
)
async def test_the_curl_line_calls_the_app_the_way_it_is_called(
    routes: dict[str, embserve.Deployment], options: dict[str, Any], hint: str
) -> None:
    async with started(App({p: d.bind() for p, d in routes.items()}, **options)) as app:
        assert curl_hint(app, URL) == hint
        assert describe(app, URL).splitlines()[-1] == f"try: {hint}"


@pytest.mark.anyio
async def test_the_banner_lists_routes_and_says_what_is_not_ready() -> None:
    app = App(
        {"/clock": Clock.bind(), "/zero": Clock.options(name="zero", num_replicas=0).bind()},
        admin_token="t",
    )
    async with started(app):
        lines = describe(app, URL).splitlines()
    assert lines == [
        f"embserve: serving on {URL} (Ctrl-C to stop)",
        "  /clock  -> Clock",
        "  /zero   -> zero",
        "  admin: /-/healthz /-/ready /-/routes /-/status /-/metrics"
        " (Bearer token: all but /-/healthz)",
        "  not ready: /zero (zero) has no running replica [HEALTHY]",
        f'try: curl -s -H "Authorization: Bearer $EMBSERVE_ADMIN_TOKEN" {URL}/-/ready',
    ]


def test_every_option_of_every_command_has_help() -> None:
    parser = _parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"run", "status"}
    for name, command in commands.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, (name, action.dest)


def test_progress_reads_plainly() -> None:
    plain = _Plain()
    record = logging.LogRecord(
        "embserve.runtime",
        logging.WARNING,
        __file__,
        1,
        "replica %s waits: %s",
        ("m#0", "a GPU"),
        None,
    )
    assert plain.format(record) == "embserve: warning: replica m#0 waits: a GPU"
    record.levelno, record.levelname = logging.INFO, "INFO"
    assert plain.format(record) == "embserve: replica m#0 waits: a GPU"


def test_the_server_is_the_fastest_installed_that_can_do_what_is_asked() -> None:
    assert choose_server() == "granian"  # granian, uvicorn and httptools are installed here
    assert choose_server("auto", read_timeout=True) == "hypercorn"
    assert choose_server("hypercorn") == "hypercorn"
    assert choose_server("uvicorn") == "uvicorn"
    for server in ("granian", "uvicorn"):
        with pytest.raises(ValueError, match=f"{server} has no read timeout; use hypercorn"):
            choose_server(server, read_timeout=True)
    with pytest.raises(ValueError, match="server must be one of auto, granian, uvicorn, hyperc"):
        choose_server("gunicorn")
