"""What the servers log: the access log's one line per request, and their own logs sent on to
the caller's server log."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AccessLog", "forward_log"]


class AccessLog:
    """ASGI middleware that logs one line per HTTP request, as hypercorn's access log does:
    ``client - - [time] "METHOD path version" status length "referer" "user-agent"``."""

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer: dict[str, Any] = {}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.update(message)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.logger.info(_line(scope, answer))


def _line(scope: Scope, answer: dict[str, Any]) -> str:
    asked = {name: value.decode("latin-1") for name, value in scope["headers"]}
    sent = {name.lower(): value.decode("latin-1") for name, value in answer.get("headers", [])}
    client = scope.get("client")
    host = f"{client[0]}:{client[1]}" if client else "-"
    when = time.strftime("[%d/%b/%Y:%H:%M:%S %z]")
    request = f"{scope['method']} {scope['path']} {scope.get('http_version', '1.1')}"
    status = answer.get("status", "-")
    length = sent.get(b"content-length", "-")
    referer, agent = asked.get(b"referer", "-"), asked.get(b"user-agent", "-")
    return f'{host} - - {when} "{request}" {status} {length} "{referer}" "{agent}"'


def forward_log(name: str, error_log: logging.Logger) -> None:
    """Send what a server logs to the logger ``name`` where the caller's server log goes."""
    server_log = logging.getLogger(name)
    server_log.propagate = False
    server_log.handlers = [_Forward(error_log)]


class _Forward(logging.Handler):
    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)
