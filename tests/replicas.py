"""An in-memory Replica for tests of the layers above the seam (router, controller)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from embserve.replica import Replica, Request


class StubReplica(Replica):
    """A replica that answers nothing; subclasses override what their test needs."""

    async def call(self, call: Request) -> Any:
        raise NotImplementedError

    async def stream(self, call: Request) -> AsyncIterator[Any]:
        if call.method:
            raise NotImplementedError
        yield

    async def check_health(self) -> None:
        pass

    async def reconfigure(self, user_config: Any) -> None:
        pass

    async def stop(self) -> None:
        pass
