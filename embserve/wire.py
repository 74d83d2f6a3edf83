"""What a user may catch from a replica in another process: :class:`RemoteError`.

Values and exceptions cross process boundaries through the remote-replica protocol's codecs
(pickle protocol 5, numpy buffers out of band); an exception that cannot be pickled, or not
rebuilt on the caller's side, arrives as a :class:`RemoteError` that keeps its type name, its
message and the replica's traceback.
"""

from __future__ import annotations

from embserve.errors import EmbserveError

__all__ = ["RemoteError"]


class RemoteError(EmbserveError):
    """A user exception that could not be pickled, re-raised with its type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
