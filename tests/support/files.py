"""Reading files another process is still appending to."""

from __future__ import annotations

import json
from pathlib import Path


def json_lines(path: Path) -> list[dict]:
    """The complete JSON lines of `path` (none if it does not exist yet).

    A writer appends while the test reads, so the last line may be cut short;
    only lines ending in a newline are whole, as a log shipper would see them.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    whole = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in whole.splitlines() if line.strip()]
