"""Showing a config change before it is saved: a line diff of canonical JSON."""

from __future__ import annotations

import difflib
import json
from typing import Any

INDEX_FIELDS = ("CreateIndex", "ModifyIndex")


def canonical(entry: dict[str, Any] | None) -> str:
    """An entry as stable, readable JSON without its index fields ("" for none)."""
    if not entry:
        return ""
    body = {k: v for k, v in entry.items() if k not in INDEX_FIELDS}
    return json.dumps(body, indent=2, sort_keys=True)


def line_diff(before: str, after: str) -> list[tuple[str, str]]:
    """[(kind, line)] with kind "add", "del" or "same", for the template to colour."""
    out = []
    for line in difflib.unified_diff(
        before.splitlines(), after.splitlines(), "saved", "edited", lineterm="", n=3
    ):
        if line.startswith(("---", "+++", "@@")):
            continue
        kind = {"+": "add", "-": "del"}.get(line[:1], "same")
        out.append((kind, line))
    return out
