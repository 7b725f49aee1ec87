"""HTTP-aware routes (``protocol = "http"``): a reverse proxy that knows which requests may
wake a sleeping node, answers polls from a cache while it sleeps, and routes by model.

Pure decisions: ``rules`` (no-wake rules), ``cache`` (last good poll answers), ``models``
(model → node), ``headers`` (hop-by-hop rules), ``framing`` (following a chunked body).
I/O: ``h1`` (the HTTP/1.1 server), ``upstream`` (kept connections per node, framed by h11),
``exchange``, ``intake`` (what is refused before any node hears of it), ``app`` (the route),
``passthrough`` (a chunked answer passed on as it was framed), ``server`` (the listener),
``waking`` (what held clients see), ``metrics`` and ``model_metrics`` (time to first token
and tokens/s per model).
"""

from edge_proxy.http_routes.server import HttpListener, group_http_routes

__all__ = ["HttpListener", "group_http_routes"]
