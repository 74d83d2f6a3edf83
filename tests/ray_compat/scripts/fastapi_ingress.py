"""Ray Serve's FastAPI HTTP guide: @serve.ingress with class-based views."""

import os

import httpx
from fastapi import FastAPI

import embserve as serve

PORT = int(os.environ.get("PORT", "8000"))
serve.start(http_options={"port": PORT})

app = FastAPI()


@serve.deployment
@serve.ingress(app)
class MyFastAPIDeployment:
    def __init__(self) -> None:
        self.greeting = "Hello"

    @app.get("/")
    def root(self) -> str:
        return f"{self.greeting}, world!"

    @app.post("/{subpath}")
    async def echo(self, subpath: str, times: int = 1) -> dict[str, str]:
        return {"echo": subpath * times}


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}


serve.run(MyFastAPIDeployment.bind(), route_prefix="/hello")

with httpx.Client(base_url=f"http://localhost:{PORT}") as client:
    resp = client.get("/hello")
    assert resp.json() == "Hello, world!", resp.text
    assert client.post("/hello/ab", params={"times": 2}).json() == {"echo": "abab"}
    assert client.get("/hello/health").json() == {"ok": True}
    assert client.post("/hello/ab", params={"times": "x"}).status_code == 422
    assert client.get("/hello/docs").status_code == 200
print("ok")
