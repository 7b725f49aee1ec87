"""What the agent tells the proxy about the models it serves, with every event.

The ids are the ones the node's llama-servers list at ``GET /v1/models``, known from config
before any of them starts (so the agent can say them at start, and the proxy can list them
while the node sleeps): an explicit ``--alias``/``-a`` wins (``a,b`` is two names); the
structured form is named by its ``models``, else the instance (``--alias NAME``, see
``supervisor.launch``); a ``command`` without an alias is
named by its ``--model`` path, as llama-server names it. Any other command (its program is
not a llama-server) names nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from inference_node.supervisor.launch import ALIAS_FLAGS
from shared.config.node import InstanceConfig
from shared.events import MAX_MODELS


def model_ids(name: str, cfg: InstanceConfig) -> list[str]:
    """The ids instance ``name`` lists at ``/v1/models`` (none for a non-llama command)."""
    argv: Sequence[str] = cfg.args if cfg.command is None else (cfg.argv_list or [])
    alias = _alias(argv)
    if alias is not None:
        return [a for a in alias.split(",") if a]  # llama-server takes --alias a,b
    if cfg.command is None:
        return cfg.model_names(name)
    if not argv or "llama" not in Path(argv[0]).name:
        return []  # python -m ... is not a model
    path = next((value for flag, value in itertools.pairwise(argv)
                 if flag in ("-m", "--model")), None)
    return [path] if path else []


def served_models(instances: Mapping[str, InstanceConfig], enabled: Iterable[str]) -> tuple[str, ...]:
    """The ids of the enabled instances (on-demand ones too: a request loads them), in config
    order, each once, at most ``MAX_MODELS``."""
    on = set(enabled)
    ids = [i for name, cfg in instances.items() if name in on for i in model_ids(name, cfg)]
    return tuple(dict.fromkeys(ids))[:MAX_MODELS]


def _alias(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--alias="):
            return arg.split("=", 1)[1] or None
        if arg in ALIAS_FLAGS and i + 1 < len(argv):
            return argv[i + 1]
    return None
