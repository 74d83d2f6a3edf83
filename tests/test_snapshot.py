"""embserve/status.py: the snapshot's machine form reads back into the same snapshot."""

from __future__ import annotations

import json

import embserve
from embserve.replica import ReplicaState
from embserve.snapshot import DeploymentStatus, EndpointStatus, ReplicaStatus, RuntimeStatus

STATUS = RuntimeStatus(
    backend="dask",
    deployments={
        "clf": DeploymentStatus(
            name="clf",
            state="UPDATING",
            message="cannot start a replica: no GPU",
            target_replicas=2,
            replicas=(
                ReplicaStatus("clf#0", ReplicaState.RUNNING, "", 3, {"worker": "tcp://w1"}),
                ReplicaStatus(
                    "clf#1",
                    ReplicaState.PENDING_ALLOCATION,
                    "waiting for GPU 0.5",
                    0,
                    {"worker": "tcp://w2", "gpu_ids": [0]},
                ),
            ),
            queued_requests=4,
            version="2",
        )
    },
    endpoints={"clf": EndpointStatus("clf", "/clf", {"clf": 0.9, "clf-v2": 0.1}, {"x": 0.05})},
)


def test_from_dict_round_trips_through_json() -> None:
    again = RuntimeStatus.from_dict(json.loads(json.dumps(STATUS.to_dict())))
    assert again == STATUS
    assert str(again) == str(STATUS)


def test_from_dict_reads_a_status_without_messages_and_with_unknown_keys() -> None:
    data = STATUS.to_dict()
    data["uptime_s"] = 12.5  # from a newer server
    del data["deployments"]["clf"]["message"]
    for replica in data["deployments"]["clf"]["replicas"]:
        del replica["message"]
    status = RuntimeStatus.from_dict(data)
    assert status.deployments["clf"].message == ""
    assert [r.message for r in status.deployments["clf"].replicas] == ["", ""]
    assert status.deployments["clf"].running_replicas == 1


def test_a_live_runtime_status_round_trips() -> None:
    @embserve.deployment(num_replicas=2)
    def double(x: int) -> int:
        return 2 * x

    with embserve.Runtime() as rt:
        rt.run(double.bind(), route_prefix="/double")
        status = rt.status()
    assert RuntimeStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status
