"""The remote-replica protocol: how a runtime talks to replicas in other processes.

One protocol for every backend whose replicas run elsewhere (local worker processes, Dask),
over a small transport seam:

- :mod:`~embserve._remote.transport`: the :class:`Transport` interface (send one message,
  callbacks for messages and for the end of the connection);
- :mod:`~embserve._remote.socket_transport`: over a connected stream socket, zero-copy;
- :mod:`~embserve._remote.memory`: an in-memory pair, for tests;
- :mod:`~embserve._remote.messages`: the message kinds and the stream window;
- :mod:`~embserve._remote.codec`: values and exceptions as pickle-5 frames;
- :mod:`~embserve._remote.pending`: the requests one end awaits answers to;
- :mod:`~embserve._remote.caller`: :class:`RemoteReplica`, the runtime's side;
- :mod:`~embserve._remote.forwarding`: the runtime's side of handle calls made in a replica;
- :mod:`~embserve._remote.server`: :class:`ReplicaServer`, the replica's side;
- :mod:`~embserve._remote.submitter`: the replica's side of its handle calls.

Only the standard library is needed at import; cloudpickle loads when something needs it.
"""

from embserve._remote.caller import RemoteReplica, encode_start
from embserve._remote.memory import MemoryTransport, memory_pair
from embserve._remote.messages import STREAM_WINDOW
from embserve._remote.server import ReplicaServer, run_replica_process
from embserve._remote.socket_transport import SocketTransport
from embserve._remote.transport import Transport

__all__ = [
    "STREAM_WINDOW",
    "MemoryTransport",
    "RemoteReplica",
    "ReplicaServer",
    "SocketTransport",
    "Transport",
    "encode_start",
    "memory_pair",
    "run_replica_process",
]
