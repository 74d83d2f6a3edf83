"""An A/B rollout: a new version takes a share of the traffic while a candidate sees a shadow copy.

``python examples/ab_rollout.py --port 8000`` serves ``/recommend`` on 127.0.0.1 and rolls out
in steps, printing each::

    curl -s -X POST http://127.0.0.1:8000/recommend -d 'user-42'

- ``recommend`` (v1) takes all traffic at first;
- ``recommend-v2`` then takes ``--share`` of it (10% by default), chosen per request;
- ``recommend-v3`` receives a shadow copy of every request: its answers are discarded, so
  callers never see it, but it is measured (``embserve_shadow_requests_total`` at ``/-/metrics``,
  and its own count at ``/shadow-count``).

Each change of the split is atomic: every request follows the old policy or the new one, none is
dropped. ``--promote`` ends with v2 taking everything.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from typing import TYPE_CHECKING

import embserve

if TYPE_CHECKING:
    from starlette.requests import Request


@embserve.deployment(num_replicas=2)
class Recommender:
    """A stand-in model: its version and a pick for the user."""

    def __init__(self, version: str, catalogue: list[str]) -> None:
        self.version = version
        self.catalogue = catalogue
        self.seen = 0

    async def __call__(self, request: Request) -> dict[str, str]:
        self.seen += 1
        user = (await request.body()).decode("utf-8", "replace") or "anonymous"
        pick = self.catalogue[sum(map(ord, user)) % len(self.catalogue)]
        return {"version": self.version, "user": user, "pick": pick}

    def count(self) -> int:
        """Requests this replica served (shadow copies included)."""
        return self.seen


@embserve.deployment
class ShadowCount:
    """``GET /shadow-count``: how many shadow copies the candidate's replica has served."""

    http_methods = ("GET",)

    def __init__(self, candidate: embserve.Handle) -> None:
        self.candidate = candidate

    async def __call__(self, request: Request) -> dict[str, int]:
        return {"shadow_copies": await self.candidate.count.remote()}


CATALOGUE = ["a book", "a film", "a song", "a game"]


def roll_out(runtime: embserve.Runtime, share: float, promote: bool) -> None:
    """Deploy the three versions on ``runtime`` and move the traffic in steps."""
    runtime.run(Recommender.bind("v1", CATALOGUE), name="recommend", route_prefix="/recommend")
    print("recommend: v1 100%", flush=True)
    runtime.run(Recommender.bind("v2", CATALOGUE[::-1]), name="recommend-v2")
    candidate = runtime.run(
        Recommender.options(num_replicas=1).bind("v3", CATALOGUE), name="recommend-v3"
    )
    runtime.run(ShadowCount.bind(candidate), name="shadow-count", route_prefix="/shadow-count")
    weights = {"recommend": round(1 - share, 6), "recommend-v2": share}
    runtime.set_traffic("recommend", weights, shadow={"recommend-v3": 1.0})
    print(f"recommend: v1 {1 - share:.0%}, v2 {share:.0%}, shadow v3 100%", flush=True)
    if promote:
        runtime.set_traffic("recommend", {"recommend-v2": 1.0})
        print("recommend: v2 100%", flush=True)


def main() -> None:
    """Serve the rollout on 127.0.0.1 until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--share", type=float, default=0.1, help="v2's share of the traffic")
    parser.add_argument("--promote", action="store_true", help="end with v2 taking everything")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with embserve.Runtime() as runtime:
        roll_out(runtime, args.share, args.promote)
        server = runtime.serve_http(port=args.port)
        print(f"serving on {server.url} (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
