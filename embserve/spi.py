"""The backend SPI: everything a distribution that adds a backend needs from the core.

A backend (ours in ``backends/``, or a third party's: Ray, Kubernetes) imports from here and
from the public modules it names, never from the core's private ones, so the core may change
inside without breaking it:

- the seams: :class:`Backend` (place, start, watch and stop replicas) and :class:`Replica` (the
  runtime's view of one), with :class:`ReplicaSpec`, :class:`ReplicaState` and the
  :class:`Request` every call arrives as;
- where user code runs: :class:`ReplicaHost` builds the user object and serves requests on it,
  with the :class:`ReplicaContext` user code sees;
- placement: :class:`ResourcePool` (fractional CPUs, GPUs per device, custom resources),
  :func:`acquire` and :func:`build_pool`;
- replicas in other processes: the remote-replica protocol over a :class:`Transport` — the
  runtime's side is :class:`RemoteReplica`, the replica's side :class:`ReplicaServer`, with
  :class:`SocketTransport` for a connected socket and :func:`memory_pair` for tests; a backend
  brings its own transport for anything else (see the Dask backend's comm transport), called
  back through :data:`OnMessage` and :data:`OnClosed`; :func:`run_replica_process` ends a
  replica's own process when its server is done;
- the codecs a transport carries: :func:`encode` and :func:`decode` (pickle protocol 5, numpy
  buffers out of band), :data:`Frame`;
- sharing replicas between the runtimes of a namespace: the :mod:`embserve.sharing` seam
  (:class:`Registry` and what it holds), :meth:`Backend.adopt`, :meth:`Backend.contact`, and
  :data:`STOP`, the message kind that asks a replica to stop (a replica serving several
  runtimes tells its owner's ``STOP`` from another's leaving);
- :func:`new_loop`: an event loop that polls a moment before each sleep (a replica process's
  loop, where the next request mostly comes within that moment), and :func:`default_poll_s`,
  how long by default;
- :func:`spawn_task`: run a coroutine's first step at once, as a task only if it waits (what
  a transport whose writes are coroutines needs to keep :meth:`Transport.send` synchronous and
  cheap).

A third-party backend registers its class in the ``embserve.backends`` entry-point group.
"""

from __future__ import annotations

from embserve._host import ReplicaHost
from embserve._loop import default_poll_s, new_loop, spawn_task
from embserve._remote import (
    STREAM_WINDOW,
    MemoryTransport,
    RemoteReplica,
    ReplicaServer,
    SocketTransport,
    Transport,
    encode_start,
    memory_pair,
    run_replica_process,
)
from embserve._remote.codec import Frame, decode, encode
from embserve._remote.messages import STOP
from embserve._remote.transport import OnClosed, OnMessage
from embserve.backends import Backend, ReplicaDied
from embserve.context import ReplicaContext
from embserve.replica import Replica, ReplicaSpec, ReplicaState
from embserve.request import Request
from embserve.resources import Allocation, ResourcePool, acquire, build_pool
from embserve.sharing import NamespaceState, Registry, SharedDeployment, SharedEndpoint

__all__ = [
    "STOP",
    "STREAM_WINDOW",
    "Allocation",
    "Backend",
    "Frame",
    "MemoryTransport",
    "NamespaceState",
    "OnClosed",
    "OnMessage",
    "Registry",
    "RemoteReplica",
    "Replica",
    "ReplicaContext",
    "ReplicaDied",
    "ReplicaHost",
    "ReplicaServer",
    "ReplicaSpec",
    "ReplicaState",
    "Request",
    "ResourcePool",
    "SharedDeployment",
    "SharedEndpoint",
    "SocketTransport",
    "Transport",
    "acquire",
    "build_pool",
    "decode",
    "default_poll_s",
    "encode",
    "encode_start",
    "memory_pair",
    "new_loop",
    "run_replica_process",
    "spawn_task",
]
