"""An importable FastAPI ingress deployment, so that it can run on the process backend."""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException

import embserve

app = FastAPI()


@embserve.deployment
@embserve.ingress(app)
class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @app.get("/")
    def root(self) -> dict[str, object]:
        return {"greeting": self.greeting, "pid": os.getpid()}

    @app.get("/hello/{name}")
    async def hello(self, name: str, shout: bool = False) -> str:
        if name == "nobody":
            raise HTTPException(status_code=404, detail="nobody is here")
        text = f"{self.greeting}, {name}"
        return text.upper() if shout else text

    def plain(self, x: int) -> int:
        """A method for handle calls, beside the routes."""
        return x + 1
