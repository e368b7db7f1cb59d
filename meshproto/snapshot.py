"""The snapshot archive: a versioned, checksummed copy of the control plane's state.

Django-free: the server writes and reads it (`registry.domain.snapshot`), and
`mesh snapshot inspect` reads it without a server. An archive is a gzip'd tar
(as Consul's) of three members:

- `meta.json`: `Format` ("meshweb-snapshot"), `Version` (of this format),
  `ID`, `Index` (the registry index it was taken at), `CreatedAt`,
  `Datacenter`, `Migrations` (the schema it was taken with), `Audit` (whether
  the audit log is in it) and `Tables` (rows per table);
- `state.json`: every table's columns and rows (`{"table": {"columns": [...],
  "rows": [[...], ...]}}`), values as JSON (bytes base64, times ISO 8601);
- `SHA256SUMS`: the SHA-256 of the two others, as `sha256sum` prints them.

`unpack` refuses (with `SnapshotError`, a message for the user) an archive
that is truncated or not one, lacks a member, fails its checksums, or was
written by a newer format version.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Any

FORMAT = "meshweb-snapshot"
VERSION = 1
MEMBERS = ("meta.json", "state.json")
SUMS = "SHA256SUMS"
# An archive's members may not claim more than this once uncompressed (a zip bomb).
MAX_MEMBER_SIZE = 2 << 30


class SnapshotError(ValueError):
    """The archive cannot be used; the message says why."""


@dataclass
class Snapshot:
    meta: dict[str, Any]
    state: dict[str, dict[str, Any]]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(meta: dict[str, Any], state: dict[str, dict[str, Any]]) -> bytes:
    """The archive of `meta` and `state` (meta gains `Format` and `Version`)."""
    meta = {"Format": FORMAT, "Version": VERSION, **meta}
    files = {
        "meta.json": json.dumps(meta, indent=2, sort_keys=True).encode(),
        "state.json": json.dumps(state, separators=(",", ":")).encode(),
    }
    files[SUMS] = "".join(f"{_sha256(files[n])}  {n}\n" for n in MEMBERS).encode()
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name in (*MEMBERS, SUMS):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = int(time.time())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise SnapshotError(f"not a snapshot archive, or a truncated one ({exc})") from None
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for info in tar:
                if not info.isfile() or info.name not in (*MEMBERS, SUMS):
                    raise SnapshotError(f"unexpected member {info.name!r} in the archive")
                if info.size > MAX_MEMBER_SIZE:
                    raise SnapshotError(f"member {info.name!r} is too large")
                f = tar.extractfile(info)
                out[info.name] = f.read() if f is not None else b""
                if len(out[info.name]) != info.size:
                    raise SnapshotError(f"member {info.name!r} is truncated")
    except tarfile.TarError as exc:
        raise SnapshotError(f"not a snapshot archive, or a truncated one ({exc})") from None
    missing = [n for n in (*MEMBERS, SUMS) if n not in out]
    if missing:
        raise SnapshotError(f"the archive lacks {', '.join(missing)} (truncated?)")
    return out


def verify(files: dict[str, bytes]) -> None:
    """Check the members against `SHA256SUMS`."""
    sums: dict[str, str] = {}
    for line in files[SUMS].decode("ascii", "replace").splitlines():
        digest, _, name = line.partition("  ")
        if name:
            sums[name.strip()] = digest.strip()
    for name in MEMBERS:
        if sums.get(name) != _sha256(files[name]):
            raise SnapshotError(f"checksum mismatch for {name}: the archive is corrupt")


def unpack(data: bytes) -> Snapshot:
    """The snapshot in `data`, verified; `SnapshotError` if it cannot be restored."""
    files = _members(data)
    verify(files)
    try:
        meta = json.loads(files["meta.json"])
        state = json.loads(files["state.json"])
    except ValueError as exc:
        raise SnapshotError(f"the archive's JSON is malformed ({exc})") from None
    if not isinstance(meta, dict) or meta.get("Format") != FORMAT:
        raise SnapshotError("not a meshweb snapshot (unknown Format)")
    version = meta.get("Version")
    if not isinstance(version, int) or version < 1:
        raise SnapshotError(f"unknown snapshot version {version!r}")
    if version > VERSION:
        raise SnapshotError(
            f"the snapshot is version {version}, newer than this meshweb reads ({VERSION}): "
            "upgrade meshweb to restore it"
        )
    if not isinstance(state, dict) or not all(
        isinstance(t, dict)
        and isinstance(t.get("columns"), list)
        and isinstance(t.get("rows"), list)
        for t in state.values()
    ):
        raise SnapshotError("the archive's state is malformed")
    return Snapshot(meta, state)


def describe(snapshot: Snapshot, size: int) -> list[tuple[str, str]]:
    """`mesh snapshot inspect`'s rows: the archive's facts, then rows per table."""
    meta = snapshot.meta
    rows = [
        ("ID", str(meta.get("ID", ""))),
        ("Size", str(size)),
        ("Index", str(meta.get("Index", ""))),
        ("Version", str(meta.get("Version", ""))),
        ("Created", str(meta.get("CreatedAt", ""))),
        ("Datacenter", str(meta.get("Datacenter", ""))),
        ("Audit", "included" if meta.get("Audit") else "not included"),
    ]
    for table, count in sorted((meta.get("Tables") or {}).items()):
        rows.append((table, str(count)))
    return rows
