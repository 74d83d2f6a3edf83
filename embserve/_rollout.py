"""Rolling out a new version of a deployment: in place, one replica at a time, or back.

Same ``version`` (and set): the running replicas are reconfigured in place. Otherwise each new
replica starts and enters routing before an old one drains; when a new replica cannot be placed
beside the old ones (they hold every GPU), old replicas are retired one at a time to make room,
so a deployment of two or more replicas always has one serving. When a new replica fails to
start, the last good version stays the template for replacements and status says so until an
update succeeds. Everything here runs on the runtime's event loop, under the controller's
update lock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from embserve._serve import with_timeout
from embserve.autoscaling import AutoscalingPolicy
from embserve.deployment import Deployment
from embserve.errors import DeploymentFailedError
from embserve.replica import Replica

if TYPE_CHECKING:
    from embserve._controller import DeploymentController

__all__ = ["roll_out"]

logger = logging.getLogger("embserve.runtime")

# How long a new replica of a rolling update may wait for resources before an old replica is
# retired to make room for it.
ROOM_CHECK_S = 1.0

_LastGood = tuple[Deployment, tuple[Any, ...], dict[str, Any], int]


async def roll_out(
    controller: DeploymentController,
    deployment: Deployment,
    init_args: tuple[Any, ...],
    init_kwargs: dict[str, Any],
) -> None:
    """Apply a new version of ``controller``'s deployment.

    Raises :class:`~embserve.DeploymentFailedError` when a new replica fails to start (the
    deployment goes on with what runs, replaced from the last good version).
    """
    async with controller.update_lock:
        old_config = controller.config
        last_good = (
            controller.deployment,
            controller.init_args,
            controller.init_kwargs,
            controller.target_replicas,
        )
        in_place = (
            deployment.config.version is not None
            and deployment.config.version == old_config.version
        )
        controller.use(deployment, init_args, init_kwargs)
        auto = controller.config.autoscaling_config
        if auto and old_config.autoscaling_config:
            # Keep the size the autoscaler reached, within the new bounds.
            policy = AutoscalingPolicy.from_config(auto)
            controller.target_replicas = min(
                max(controller.target_replicas, policy.min_replicas), policy.max_replicas
            )
        else:
            controller.target_replicas = controller.config.initial_replicas
        controller.state = "UPDATING"
        began = controller.clock.now()
        logger.info(
            "updating %r%s: %d replica(s)%s",
            controller.name,
            f" to version {deployment.config.version}" if deployment.config.version else "",
            controller.target_replicas,
            " in place" if in_place else ", one at a time",
        )
        if in_place:
            user_config = controller.config.user_config
            if user_config != old_config.user_config:
                await asyncio.gather(*(r.reconfigure(user_config) for r in controller.running))
            await controller.scale_to(controller.target_replicas, fail_fast=True)
        else:
            await _replace_one_by_one(controller, last_good)
        controller.state, controller.message = "HEALTHY", ""
        controller.failed_update = None
        controller.configure_autoscaling()
        logger.info(
            "%r ready: %d/%d in %.1f s",
            controller.name,
            len(controller.running),
            controller.target_replicas,
            controller.clock.now() - began,
        )


async def _replace_one_by_one(controller: DeploymentController, last_good: _LastGood) -> None:
    old = list(controller.running)
    for index in range(max(len(old), controller.target_replicas)):
        if index < controller.target_replicas:
            try:
                replica = await _start_beside(controller, old)
            except DeploymentFailedError as exc:
                _roll_back(controller, last_good, exc)
                raise
            controller.route_to([*controller.running, replica])
        if old:
            controller.spawn(controller.retire(old.pop(0)))


async def _start_beside(controller: DeploymentController, old: list[Replica]) -> Replica:
    # Start a replica of the new version. While it waits for resources that the old replicas
    # hold, retire old ones (taken from ``old``), one at a time, to make room.
    start = asyncio.ensure_future(controller.start_one())
    try:
        while True:
            try:
                replica: Replica = await with_timeout(
                    controller.clock, asyncio.shield(start), ROOM_CHECK_S
                )
            except TimeoutError:
                if start.done():
                    raise
                if old and controller.backend.pending.get(controller.name):
                    victim = old.pop()
                    logger.info(
                        "deployment %s: no room for a new replica beside the old ones; "
                        "retiring %s first",
                        controller.name,
                        victim.replica_id,
                    )
                    await controller.retire(victim)
                continue
            return replica
    except BaseException:
        start.cancel()
        raise


def _roll_back(
    controller: DeploymentController, last_good: _LastGood, error: BaseException
) -> None:
    deployment, init_args, init_kwargs, target = last_good
    failed = controller.config.version or "the new version"
    controller.use(deployment, init_args, init_kwargs)
    controller.target_replicas = target
    summary = (str(error).splitlines() or [type(error).__name__])[0]
    version = controller.config.version
    good = f"version {version}" if version else "the last good version"
    controller.state = "UNHEALTHY"
    controller.failed_update = (
        f"the update to {failed} failed ({summary}); replicas are replaced from {good}"
    )
    logger.error("deployment %s: %s", controller.name, controller.failed_update)
    if len(controller.running) < controller.target_replicas:
        controller.start_replacing(controller.failed_update)
