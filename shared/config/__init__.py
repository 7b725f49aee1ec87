"""Config schemas and the TOML loader both services use."""

from shared.config.loader import Context, Secret, build, load, read_toml, setting

__all__ = ["Context", "Secret", "build", "load", "read_toml", "setting"]
