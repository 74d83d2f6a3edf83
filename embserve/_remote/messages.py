"""The vocabulary of the remote-replica protocol: message kinds and the stream window.

Every message is ``(kind, ident, frames)``: ``kind`` one of the codes below (one byte on a
socket), ``ident`` the request it belongs to, ``frames`` its payload as
:func:`~embserve._remote.codec.encode` made it (no frames: no payload). The caller numbers the
requests it sends (calls, streams, health checks, reconfigures); the replica numbers the handle
calls its user code makes (submits). The two numberings are independent, which is why the
answers to submits have kinds of their own (``SUB_*``).

Caller → replica:

- ``START`` (ident 0): the :class:`~embserve.replica.ReplicaSpec` and
  :class:`~embserve.context.ReplicaContext`, pickled by value. Answered by ``STARTED`` (what the
  replica says about where it runs) or ``START_FAILED`` (an error payload).
- ``CALL`` / ``STREAM``: a :meth:`Request.to_wire <embserve.request.Request.to_wire>`. A call is
  answered by one ``OK`` or ``ERR``; a stream by ``ITEM``\\ s and one ``END`` or ``ERR``, the
  replica sending at most :data:`STREAM_WINDOW` items beyond what ``MORE`` granted.
- ``HEALTH`` (no payload) / ``RECONFIGURE`` (the user config): answered by ``OK`` or ``ERR``.
- ``STATS`` (no payload): answered by ``OK`` with the replica's own
  :class:`~embserve.metrics.ReplicaStats` (execution times, batch sizes, model loads).
- ``CANCEL``: the caller gave up on a request. Always answered by exactly one ``ENDED`` once the
  request's work really ended (sync user code in a thread runs on after it was cancelled), so
  that the caller can hold the request's router lease until then.
- ``MORE``: the reader of a stream took this many items; the replica may send as many more.
- ``STOP`` (ident 0): finish; the replica closes its end.
- ``SUB_OK`` / ``SUB_ERR`` / ``SUB_ITEM`` / ``SUB_END``: the answers to the replica's submits.

Replica → caller: ``STARTED``, ``START_FAILED``, ``OK``, ``ERR``, ``ITEM``, ``END``,
``ENDED``; ``SUBMIT`` / ``SUBMIT_STREAM`` (a handle call made inside the replica: its target
and wire form), ``SUB_CANCEL`` and ``SUB_MORE`` (the same credit window, the other way); and
``NOTICE`` (ident 0): something the replica's side tells its caller unasked (a value, no
answer), which the caller hands to :meth:`RemoteReplica.on_notice
<embserve._remote.caller.RemoteReplica.on_notice>`, e.g. that the machine it runs on is
closing.
"""

from __future__ import annotations

# Plain ints, not an enum: they are compared and looked up on every message.
START = 0
STARTED = 1
START_FAILED = 2
CALL = 3
STREAM = 4
HEALTH = 5
RECONFIGURE = 6
CANCEL = 7
MORE = 8
STOP = 9
OK = 10
ERR = 11
ITEM = 12
END = 13
ENDED = 14
SUBMIT = 15
SUBMIT_STREAM = 16
SUB_CANCEL = 17
SUB_MORE = 18
SUB_OK = 19
SUB_ERR = 20
SUB_ITEM = 21
SUB_END = 22
NOTICE = 23
STATS = 24

#: Each kind's name, by code (for logs).
NAMES = (
    "start",
    "started",
    "start_failed",
    "call",
    "stream",
    "health",
    "reconfigure",
    "cancel",
    "more",
    "stop",
    "ok",
    "err",
    "item",
    "end",
    "ended",
    "submit",
    "submit_stream",
    "sub_cancel",
    "sub_more",
    "sub_ok",
    "sub_err",
    "sub_item",
    "sub_end",
    "notice",
    "stats",
)

#: Items a stream may send ahead of what its reader took; the reader grants more as it reads
#: (half a window at a time), so a fast generator cannot fill memory behind a slow reader.
STREAM_WINDOW = 64


def name_of(kind: int) -> str:
    """The name of ``kind`` (``unknown-N`` for a code this version does not know)."""
    return NAMES[kind] if 0 <= kind < len(NAMES) else f"unknown-{kind}"
