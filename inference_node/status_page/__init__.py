"""The node-agent's own page at ``/`` on its API listener: instances (which models are
loaded, which are not), GPUs and their P-states, and what keeps the node awake, drawn from
``/v1/status``, ``/v1/gpus`` and ``/v1/power``. The page files hold no data and are public;
the JSON keeps the API's token rule (see ``shared.web`` for how the page gets the token).

While the node sleeps this page is unreachable; the proxy's dashboard is the one that
shows history.
"""

from __future__ import annotations

from typing import Final

from shared.http import App
from shared.web import SHARED_ASSETS, add_assets

ASSETS: Final = {"/": ("inference_node.status_page", "index.html"),
                 "/static/node.js": ("inference_node.status_page", "node.js"),
                 **SHARED_ASSETS}
PUBLIC_PATHS: Final = frozenset(ASSETS)


def routes(app: App) -> None:
    """Add the page and its files to ``app``."""
    add_assets(app, ASSETS)
