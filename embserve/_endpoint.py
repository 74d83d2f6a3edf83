"""Endpoints: a name, an optional route prefix, and a traffic policy over deployments."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections.abc import Mapping


def _check_shares(what: str, shares: Mapping[str, float], *, total: bool) -> dict[str, float]:
    if not isinstance(shares, Mapping):
        raise TypeError(f"{what} must map deployment names to shares, got {shares!r}")
    clean: dict[str, float] = {}
    for name, share in shares.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: deployment names must be str, got {name!r}")
        if (
            isinstance(share, bool)
            or not isinstance(share, (int, float))
            or not math.isfinite(share)
        ):
            raise TypeError(f"{what}[{name!r}] must be a number, got {share!r}")
        if share < 0 or (not total and share > 1):
            bound = ">= 0" if total else "between 0 and 1"
            raise ValueError(f"{what}[{name!r}] must be {bound}, got {share}")
        clean[name] = float(share)
    if total and not any(clean.values()):
        raise ValueError(f"{what} must give a positive share to at least one deployment")
    return clean


class Endpoint:
    """Where requests to one name go: a weighted choice among deployments, plus shadows.

    ``traffic`` weights are normalised (``{"a": 9, "b": 1}`` is 90/10). Each ``shadow`` share is
    the probability that a request is also copied to that deployment, its result discarded.
    The policy is replaced whole by :meth:`set_traffic`, so each request sees the old or the new
    one, never a mix.
    """

    def __init__(
        self,
        name: str,
        route_prefix: str | None,
        traffic: Mapping[str, float],
        shadow: Mapping[str, float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.route_prefix = route_prefix
        self.rng = rng if rng is not None else random.Random()
        self.set_traffic(traffic, shadow or {})

    def set_traffic(self, traffic: Mapping[str, float], shadow: Mapping[str, float]) -> None:
        """Replace the policy."""
        weights = _check_shares("traffic", traffic, total=True)
        shadows = _check_shares("shadow", shadow, total=False)
        targets = [name for name, weight in weights.items() if weight > 0]
        total = sum(weights[name] for name in targets)
        cumulative = list(itertools.accumulate(weights[name] / total for name in targets))
        self.traffic = {name: weights[name] / total for name in targets}
        self.shadow = {name: share for name, share in shadows.items() if share > 0}
        self._targets = targets
        self._cumulative = cumulative
        #: The one deployment that gets every request, or None during a split.
        self.single = targets[0] if len(targets) == 1 else None

    @property
    def deployments(self) -> set[str]:
        """Every deployment this endpoint may send a request or a shadow copy to."""
        return set(self.traffic) | set(self.shadow)

    def pick(self, routing_key: str | None = None) -> str:
        """The deployment that serves the next request.

        A request with a routing key always goes to the same deployment while the weights
        stay (its key hashes to a fixed point of the weight line), so a sticky session keeps
        its version as well as its replica during a split.
        """
        if self.single is not None:
            return self.single
        point = self.rng.random() if routing_key is None else _unit_hash(routing_key)
        index = bisect.bisect_right(self._cumulative, point)
        return self._targets[min(index, len(self._targets) - 1)]

    def shadow_targets(self) -> list[str]:
        """The deployments that get a copy of the next request."""
        rng = self.rng
        return [name for name, share in self.shadow.items() if rng.random() < share]


def _unit_hash(key: str) -> float:
    # A point in [0, 1) for ``key``, the same in every process and run (BLAKE2b, not the salted
    # built-in hash), and independent of the router's ring hash of the same key.
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"embserve-split").digest()
    return int.from_bytes(digest, "big") / 2**64
