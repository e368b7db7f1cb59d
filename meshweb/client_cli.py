"""Client commands of `mesh` (the Consul-style CLI); they live in `meshweb.commands`."""

from __future__ import annotations

from meshweb.commands import add_commands

__all__ = ["add_commands"]
