"""Enable/disable made through the API, kept in a small TOML state file across reloads and restarts.

The config files stay as people wrote them (comments and all); the agent writes only
``agent.state_file``::

    [instances.qwen]
    enabled = false          # what the API set
    config_enabled = true    # what the config said at that moment

An override applies while the config still says ``config_enabled``. When someone edits
``enabled`` in the config afterwards, the edit wins and the override is dropped: the last
deliberate change, wherever it was made, decides.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from inference_node.errors import StateFileError
from shared.config.node import InstanceConfig

log = logging.getLogger(__name__)

HEADER = b"# Written by node-agent: enable/disable made with `node-agent enable|disable NAME`.\n\n"


@dataclass(frozen=True)
class Override:
    enabled: bool
    config_enabled: bool


class EnabledOverrides:
    """The overrides in ``path``; an unreadable file is logged and treated as empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, Override] = self._load()

    def effective(self, instances: Mapping[str, InstanceConfig]) -> dict[str, bool]:
        """The enabled setting of each instance, with the overrides that still apply."""
        result: dict[str, bool] = {}
        stale = []
        for name, cfg in instances.items():
            entry = self._entries.get(name)
            if entry is not None and entry.config_enabled != cfg.enabled:
                stale.append(name)  # the config was edited since: it wins
                entry = None
            result[name] = entry.enabled if entry is not None else cfg.enabled
        if stale:
            for name in stale:
                del self._entries[name]
            log.info("config changed enabled for %s since the API set it; the config wins", stale)
            try:
                self._save()
            except StateFileError as exc:
                log.warning("%s", exc)
        return result

    def set(self, name: str, enabled: bool, config_enabled: bool) -> None:
        """Record an override and write the file; raises ``StateFileError`` if it cannot."""
        entries = dict(self._entries)
        if enabled == config_enabled:
            entries.pop(name, None)  # back to what the config says: nothing to remember
        else:
            entries[name] = Override(enabled, config_enabled)
        previous, self._entries = self._entries, entries
        try:
            self._save()
        except StateFileError:
            self._entries = previous
            raise

    def get(self, name: str) -> Override | None:
        return self._entries.get(name)

    def _load(self) -> dict[str, Override]:
        try:
            with self.path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable (%s); ignoring enable/disable overrides", self.path, exc)
            return {}
        entries = {}
        for name, table in (data.get("instances") or {}).items():
            if isinstance(table, dict) and isinstance(table.get("enabled"), bool) \
                    and isinstance(table.get("config_enabled"), bool):
                entries[name] = Override(table["enabled"], table["config_enabled"])
            else:
                log.warning("%s: instances.%s: malformed; ignoring it", self.path, name)
        return entries

    def _save(self) -> None:
        data = {"instances": {n: {"enabled": o.enabled, "config_enabled": o.config_enabled}
                              for n, o in sorted(self._entries.items())}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                fh.write(HEADER + tomli_w.dumps(data).encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new file
        except OSError as exc:
            raise StateFileError(
                f"cannot write state file {self.path}: {exc.strerror or exc}; "
                "make its folder writable or set agent.state_file"
            ) from exc
