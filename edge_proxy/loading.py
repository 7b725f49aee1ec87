"""Models on demand, the proxy's side: ask a node's agent for its models and to load one.

A node whose ``[nodes.NAME]`` names ``agent_url`` may serve models that are not loaded
(instances ``load = "on-demand"`` on the agent). The proxy then:

- learns every model the node can serve, loaded or not, from the agent's ``GET /v1/models``
  while the node is awake, and keeps that list while it sleeps (``NodeModels``);
- before sending a request for a model that is not LOADED there, asks the agent to load it
  (``POST /v1/models/{model}/load``, which returns once the model is ready, or an error that
  says why) and holds the request meanwhile, as it holds one while the node wakes. A model
  that is being evicted is loaded again the same way: it gets no request until then.

One load per (node, model) at a time (``ModelLoader``): concurrent requests for one model
that is not loaded wait on the same load, not one each.

The agent API this relies on (node-agent's on-demand routes; errors are
``{"error": {"message", "type", "source": "node-agent"}}``):

    GET  /v1/models              {"models": [{"model", "instance", "state", ...}]}, one row
                                 per name; state: loaded, loading, stopping or unloaded
    GET  /v1/instances           {"instances": [{"name", "port", ...}]}: the port of each
                                 instance, so a TCP route's backend_port names its models
    POST /v1/models/{model}/load 200 once it is READY; 404 model_not_found, 409 load_refused,
                                 502 load_failed, each with the reason
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from edge_proxy.agent_http import AgentHttp, AgentHttpError
from edge_proxy.errors import AgentError, LoadFailed
from shared.config.edge import NodeConfig

log = logging.getLogger(__name__)

# The model list is small and the agent answers it from memory: a slow answer is a sick agent.
MODELS_TIMEOUT_S: Final = 5.0
# A load error's message is read up to this size (it is one line from the agent).
MAX_ERROR_BYTES: Final = 4096


class ModelState(enum.Enum):
    """A model's state as the agent reports it (UNKNOWN: a word this proxy does not know)."""

    LOADED = "loaded"
    LOADING = "loading"
    STOPPING = "stopping"  # being evicted (or its TTL ran out): no new requests until loaded
    UNLOADED = "unloaded"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, text: object) -> ModelState:
        try:
            return cls(str(text).lower())
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class AgentModel:
    """One model name the agent serves: its instance and that instance's port, if known."""

    id: str
    state: ModelState
    instance: str | None = None
    port: int | None = None


def _rows(body: bytes, key: str) -> list[dict[str, Any]]:
    try:
        rows = json.loads(body)[key]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"no {key} list ({type(exc).__name__}: {exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"no {key} list ({key} is not a list of objects)")
    return rows


def parse_model_list(models: bytes, instances: bytes | None = None) -> list[AgentModel]:
    """The agent's ``GET /v1/models`` answer, with ports from its ``GET /v1/instances``
    answer when given; raises ``ValueError`` naming what is wrong."""
    ports = {}
    for row in _rows(instances, "instances") if instances is not None else []:
        if isinstance(row.get("name"), str) and isinstance(row.get("port"), int):
            ports[row["name"]] = row["port"]
    out = []
    for row in _rows(models, "models"):
        if not isinstance(row.get("model"), str):
            raise ValueError(f"a model row without a model name: {row!r:.100}")
        instance = row.get("instance") if isinstance(row.get("instance"), str) else None
        out.append(AgentModel(row["model"], ModelState.parse(row.get("state")), instance,
                              ports.get(instance) if instance else None))
    return out


@dataclass
class NodeModels:
    """What one node can serve, as its agent last said (kept while the node sleeps)."""

    models: dict[str, AgentModel] = field(default_factory=dict)
    seen_at: float | None = None  # trio time of the last answer

    def update(self, models: Iterable[AgentModel], now: float) -> None:
        self.models = {m.id: m for m in models}
        self.seen_at = now

    def loaded(self, model: str) -> None:
        """The agent said ``model`` is ready (its load call returned)."""
        known = self.models.get(model) or AgentModel(model, ModelState.LOADED)
        self.models[model] = dataclasses.replace(known, state=ModelState.LOADED)

    def evicted(self, instances: Iterable[str]) -> None:
        """The agent stopped these instances (for another model), or is about to (its
        ``unloading`` event): their models are gone until loaded again."""
        gone = set(instances)
        for m in list(self.models.values()):
            if m.instance in gone:
                self.models[m.id] = dataclasses.replace(m, state=ModelState.UNLOADED)

    def unloaded(self, model: str) -> None:
        """``model``'s instance refused a connection: it must be asked for again."""
        known = self.models.get(model)
        if known is not None:
            self.models[model] = dataclasses.replace(known, state=ModelState.UNLOADED)

    def needs_load(self, model: str) -> bool:
        """Whether a request for ``model`` must wait for a load first. A model the agent has
        not listed is left to the backend to answer (it may be served under another name)."""
        known = self.models.get(model)
        return known is not None and known.state is not ModelState.LOADED

    def model_on_port(self, port: int) -> str | None:
        """A model name of the instance whose llama-server listens on ``port`` (TCP routes
        hold for it), if the agent said which port that is."""
        return next((m.id for m in self.models.values() if m.port == port), None)

    def openai_list(self, port: int | None = None) -> dict[str, Any]:
        """Every model, loaded or not, as an OpenAI model list (what ``/v1/models`` lists);
        with ``port``, only those of the instance on that port (and those whose port the
        agent did not say)."""
        return {"object": "list", "data": [{"id": m.id, "object": "model", "owned_by": "llamanap"}
                                           for m in self.models.values()
                                           if port is None or m.port in (None, port)]}


class AgentClient:
    """HTTP client of one node's agent API. Errors become ``AgentError`` / ``LoadFailed``."""

    def __init__(self, node: str, cfg: NodeConfig) -> None:
        if cfg.agent_url is None:
            raise ValueError(f"node {node} has no agent_url")
        self.node = node
        self.url = cfg.agent_url.rstrip("/")
        headers = [(b"accept", b"application/json")]
        if cfg.agent_token is not None:
            headers.append((b"authorization", f"Bearer {cfg.agent_token.reveal()}".encode()))
        # Timeouts are cancel scopes at the call sites (a load may take minutes).
        self._http = AgentHttp(self.url, headers)

    def __repr__(self) -> str:
        return f"<AgentClient {self.node} {self.url}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[AgentModel]:
        """Every model the node can serve, with its instance's port; raises ``AgentError``."""
        models = await self._get("/v1/models")
        instances = await self._get("/v1/instances")
        try:
            return parse_model_list(models, instances)
        except ValueError as exc:
            raise AgentError(f"agent of {self.node} at {self.url}: {exc}") from exc

    async def _get(self, path: str) -> bytes:
        where = f"agent of {self.node} at {self.url}: GET {path}"
        with trio.move_on_after(MODELS_TIMEOUT_S) as scope:
            try:
                answer = await self._http.request("GET", path)
            except AgentHttpError as exc:
                raise AgentError(f"{where}: {exc}") from exc
        if scope.cancelled_caught:
            raise AgentError(f"{where}: no answer after {MODELS_TIMEOUT_S:g} s")
        if answer.status != 200:
            raise AgentError(f"{where} answered {answer.status}: {_reason(answer.body)}")
        return answer.body

    async def load(self, model: str) -> list[str]:
        """Return once the agent says ``model`` is ready, with the instances it evicted for
        it; raise ``LoadFailed`` with its reason. The caller bounds the wait (a load may take
        minutes)."""
        path = f"/v1/models/{urllib.parse.quote(model, safe='')}/load"
        try:
            answer = await self._http.request("POST", path, b"{}")
        except AgentHttpError as exc:
            raise LoadFailed(model, self.node, f"agent at {self.url} unreachable: {exc}"
                             ) from exc
        if answer.status != 200:
            raise LoadFailed(model, self.node, f"the agent answered {answer.status}: "
                             f"{_reason(answer.body)}")
        try:
            evicted = json.loads(answer.body).get("evicted") or []
        except (ValueError, AttributeError):
            evicted = []
        return [name for name in evicted if isinstance(name, str)]


def _reason(body: bytes) -> str:
    """The ``error.message`` of an agent's error answer, else the start of the body."""
    try:
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return body[:MAX_ERROR_BYTES].decode("utf-8", "replace").strip() or "(empty answer)"


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    failure: LoadFailed | None = None
    evicted: list[str] = field(default_factory=list)


# (node, model) -> returns once loaded, with the instances evicted for it
Load = Callable[[str, str], Awaitable[list[str]]]


class ModelLoader:
    """Loads models on demand, one load per (node, model) at a time, each in this loader's
    nursery (``run``) so a load outlives the request that started it: the next request
    finds the model loaded. ``load`` does the work (``AgentClient.load`` per node)."""

    def __init__(self, load: Load, load_timeout_s: Callable[[str], float]) -> None:
        self._load = load
        self._timeout_s = load_timeout_s
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self.loads: dict[tuple[str, str], int] = {}  # loads started, per (node, model)

    def __repr__(self) -> str:
        loading = ", ".join(f"{n}/{m}" for n, m in self._flights) or "nothing"
        return f"<ModelLoader loading {loading}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the loads until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def loading(self, node: str, model: str) -> bool:
        return (node, model) in self._flights

    async def ensure_loaded(self, node: str, model: str) -> list[str]:
        """Return once ``model`` is loaded on ``node``, with the instances evicted for it:
        join the load under way or start one. Raises ``LoadFailed`` (naming the model and
        why) when it fails or times out."""
        if self._nursery is None:
            raise RuntimeError("ModelLoader.ensure_loaded before run() started")
        key = (node, model)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            self.loads[key] = self.loads.get(key, 0) + 1
            self._nursery.start_soon(self._fly, key, flight)
        await flight.done.wait()
        if flight.failure is not None:
            raise flight.failure
        return flight.evicted

    async def _fly(self, key: tuple[str, str], flight: _Flight) -> None:
        node, model = key
        timeout_s = self._timeout_s(node)
        started = trio.current_time()
        ended = False
        try:
            with trio.move_on_after(timeout_s) as scope:
                flight.evicted = await self._load(node, model)
            if scope.cancelled_caught:
                flight.failure = LoadFailed(model, node, f"not loaded after {timeout_s:g} s "
                                            f"(nodes.{node}.load_timeout_s)")
            ended = True
        except LoadFailed as exc:
            flight.failure = exc
            ended = True
        finally:
            if not ended:  # cancelled (shutdown) or a bug: no waiter may take it as loaded
                flight.failure = LoadFailed(model, node, "the load was interrupted")
            del self._flights[key]
            flight.done.set()
        took = trio.current_time() - started
        if flight.failure is None:
            log.info("node %s: model %s loaded in %.2f s", node, model, took)
        else:
            log.warning("node %s: %s", node, flight.failure)


class ModelGate:
    """One node's models on demand, for the routes: what is loaded, and the wait for a load.
    Built per node with an agent (``agent_url``); the table is this gate's, the loads the
    shared ``ModelLoader``'s."""

    def __init__(self, node: str, client: AgentClient, loader: ModelLoader) -> None:
        self.node = node
        self.client = client
        self.loader = loader
        self.table = NodeModels()

    def __repr__(self) -> str:
        states = ", ".join(f"{m.id}={m.state.value}" for m in self.table.models.values())
        return f"<ModelGate {self.node} {states or '(no list yet)'}>"

    async def refresh(self) -> bool:
        """Ask the agent for its models (call while the node is awake); False on failure,
        keeping the last list."""
        try:
            models = await self.client.models()
        except AgentError as exc:
            log.info("node %s: model list not refreshed: %s", self.node, exc)
            return False
        self.table.update(models, trio.current_time())
        return True

    def need(self, model: str | None) -> ModelNeed | None:
        """What a request for ``model`` waits for beyond the wake (None: nothing). Before
        the first list (a node asleep since the proxy started) any model may be on demand:
        the list is asked for once the node is up."""
        if model is None or (self.table.seen_at is not None and model not in self.table.models):
            return None
        return ModelNeed(self, model)

    def need_for_port(self, port: int) -> ModelNeed | None:
        """For a TCP route: the model of the instance behind ``port``, if the agent said."""
        model = self.table.model_on_port(port)
        return None if model is None else ModelNeed(self, model)


@dataclass(frozen=True)
class ModelNeed:
    """A request's model on one node: loaded, or the load to wait for (``Admission``)."""

    gate: ModelGate
    model: str

    def ready(self) -> bool:
        return not self.gate.table.needs_load(self.model)

    def loading(self) -> bool:
        """Whether a load of this model is under way (what a held client is told)."""
        return self.gate.loader.loading(self.gate.node, self.model)

    def gone(self) -> None:
        """Its backend refused a connection: the instance went away (TTL, eviction); ask
        the agent again before the next request goes there."""
        self.gate.table.unloaded(self.model)

    async def wait_loaded(self) -> None:
        """Ask the agent (once per model at a time) and return once it is loaded; raise
        ``LoadFailed``. Asked even when the list says loaded: after a wake the list is from
        before the sleep, and the agent answers at once for a model that is loaded."""
        gate = self.gate
        evicted = await gate.loader.ensure_loaded(gate.node, self.model)
        gate.table.evicted(evicted)
        gate.table.loaded(self.model)
