"""The on-demand scheduler's control API (what the edge proxy and ``node-agent load`` call).

Routes:
    GET  /v1/models                  every model the node can serve, loaded or not:
                                     {"models": [{"model", "instance", "load", "state",
                                     "enabled", "busy", "gpus", "estimated_mib",
                                     "estimate_error", "last_use_s_ago", "ttl_s",
                                     "ttl_left_s"}]}; state: loaded, loading, stopping, unloaded
    POST /v1/models/{model}/load     returns once it is READY: {"model", "instance",
                                     "state": "loaded", "reason", "evicted", "load_s"}
                                     (load_s null: it was loaded already); errors: 404
                                     model_not_found, 409 load_refused, 502 load_failed
    POST /v1/models/{model}/unload   returns once it has exited: {"model", "instance",
                                     "state": "unloaded"}; 409 for a load = "always" instance
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference_node.errors import LoadFailed, LoadRefused, UnknownModel
from shared.http import App, HTTPError, Request, Response

if TYPE_CHECKING:
    from inference_node.ondemand.service import OnDemandService


def add_routes(app: App, service: OnDemandService) -> None:
    """The routes above, answered by ``service``."""

    @app.route("GET", "/v1/models")
    async def models(req: Request) -> Response:
        return Response.json({"models": await service.status()})

    @app.route("POST", "/v1/models/{model}/load")
    async def load(req: Request) -> Response:
        model = req.params["model"]
        try:
            out = await service.load(model)
        except UnknownModel as exc:
            raise HTTPError(404, str(exc), "model_not_found") from exc
        except LoadRefused as exc:
            raise HTTPError(409, str(exc), "load_refused") from exc
        except LoadFailed as exc:
            raise HTTPError(502, str(exc), "load_failed") from exc
        return Response.json({
            "model": model, "instance": out.instance, "state": "loaded",
            "reason": out.reason, "evicted": list(out.evicted),
            "load_s": None if out.load_s is None else round(out.load_s, 3)})

    @app.route("POST", "/v1/models/{model}/unload")
    async def unload(req: Request) -> Response:
        model = req.params["model"]
        try:
            name = await service.unload(model)
        except UnknownModel as exc:
            raise HTTPError(404, str(exc), "model_not_found") from exc
        except LoadRefused as exc:
            raise HTTPError(409, str(exc), "unload_refused") from exc
        return Response.json({"model": model, "instance": name, "state": "unloaded"})
