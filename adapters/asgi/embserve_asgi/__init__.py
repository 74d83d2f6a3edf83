"""embserve's ASGI adapter: serve endpoints over HTTP under hypercorn, or mounted in any app.

``embserve.App`` and ``Runtime.asgi_app()`` resolve to :class:`App` here, ``embserve.ingress``
to :func:`ingress`; ``embserve run`` is
:mod:`embserve_asgi.cli`.
"""

from __future__ import annotations

from embserve_asgi.app import App
from embserve_asgi.ingress import ingress
from embserve_asgi.requests import HTTPRequest, RequestSnapshot
from embserve_asgi.server import serve

__all__ = ["App", "HTTPRequest", "RequestSnapshot", "ingress", "serve"]
