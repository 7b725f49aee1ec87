"""edge-proxy: relays TCP/HTTP to a GPU box and wakes it with Wake-on-LAN when it sleeps.

Module map:

- ``wake/``: waking a node. ``wake.machine``: the wake state machine of one node, pure
  (events and ``now`` in, actions out); ``wake.driver``: runs a node's machine under trio
  (probes, magic packets, held connections; ``await driver.wait_awake()`` is what a held
  connection waits on); ``wake.wol``: magic packets and the ``WolSender`` that puts them on
  the wire.
- ``admission``: the one step every route takes before it talks to a node: admit within
  the held limits, hold until the node is ready, connect (retrying), with a clear outcome;
  and ``ConnectionCounts``, the open and held connections of all routes.
- ``probe``: backend connects and readiness checks (ready / refused / timed out).
- ``tcp_routes/``: TCP routes. ``tcp_routes.listener``: accept, keep a held client's bytes,
  relay; ``tcp_routes.relay``: a connection's relay (held bytes first, then both ways with
  half-close), the trio engine that relays when no loop runs, and the client bytes kept
  while held; ``tcp_routes.relay_loop``: the one thread that moves the bytes of every
  established relay (its epoll loop in ``tcp_routes.relay_thread``; a failure ends its
  relays as broken and hands new ones to the trio engine); ``tcp_routes.idle``: the idle
  timeouts both engines apply.
- ``http_routes/``: HTTP-aware routes (``protocol = "http"``) on the same drivers;
  ``http_routes.knowledge``: what each node serves (its agent's list, its last
  ``/v1/models`` answer), kept in ``state_dir``; ``http_routes.poll_answers`` and
  ``http_routes.polls``: the proxy's own answers to no-wake polls and when one goes through.
- ``history/``: what the proxy saw, in SQLite on this box. ``history.records``: the rows;
  ``history.store``: the ``Recorder`` the request path calls and its one writer thread;
  ``history.query``: reading rows back; ``history.timings``: llama-server's numbers from a
  passing response; ``history.hooks``: a request's row in the making, power-state intervals;
  ``history.energy``: kWh used and saved, pure; ``history.cli``: ``history`` and ``energy``.
- ``control``: ``/status``, ``/metrics``, agent events (schema in ``shared.events``) and
  reports (schema in ``shared.reports``), and the dashboard's routes.
- ``dashboard/``: the page at ``/`` on the control listener. ``dashboard.source``: the
  history queries it reads (a Protocol); ``dashboard.summary``: rows and status into the JSON
  the page polls (pure); ``dashboard.reading``: one refresh, whole or since the page's
  ``dashboard.cursor``; ``dashboard.routes``: the page's files and JSON endpoints;
  ``dashboard.history_db``: that Protocol over the history database. The page is
  ``index.html`` + ``dashboard.js`` + ``merge.js`` (package data).
- ``reports/``: what nodes report. ``reports.intake``: each record stored once, in order
  (stream and sequence numbers; the marks kept in the history when it is on);
  ``reports.sink``: where stored records go.
- ``alerts/``: ``alerts.policy``: which observations are alerts and which may go out now,
  pure; ``alerts.runner``: log line, ``edge_alerts_total`` and the alert command.
- ``metrics``: the Prometheus registry.
- ``service``: the whole proxy service (``serve_proxy`` in-process, ``run_service`` for ``run``).
- ``cli``, ``doctor``, ``errors``.
"""
