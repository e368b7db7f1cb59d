"""The config dir(s): every definition file read, or every error named.

The file format (JSON, YAML, HCL; Consul's field names) lives in
`meshproto.servicedefs`, shared with `mesh services register`. Here: which
files a config dir holds (`.json`, `.yaml`/`.yml`, `.hcl`, in name order, as
Consul reads them) and the all-or-nothing rule the agent applies on start and
on SIGHUP: one bad file and nothing is taken from any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meshproto.servicedefs import DefinitionError, config_dir_files, load_config_file


@dataclass
class Declared:
    """What the config dirs declare (canonical definitions), or why they cannot be used."""

    services: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # each names its file


def read_config_dirs(dirs: tuple[Path, ...] | list[Path]) -> Declared:
    out = Declared()
    for d in dirs:
        try:
            files = config_dir_files(d)
        except OSError as exc:
            out.errors.append(f"{d}: {exc.strerror}")
            continue
        for path in files:
            try:
                loaded = load_config_file(path)
            except DefinitionError as exc:
                out.errors.append(str(exc))
                continue
            out.services += loaded.services
            out.checks += loaded.checks
    return out
