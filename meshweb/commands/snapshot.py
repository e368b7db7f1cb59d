"""`mesh snapshot save|restore|inspect`: back up and restore the whole registry, as `consul snapshot`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from meshproto import snapshot as archive
from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_group,
    api_failure,
    out,
    tabulate,
)

# A snapshot of a large registry takes a while to read or load.
SNAPSHOT_TIMEOUT = 600.0


def cmd_save(args: argparse.Namespace) -> int:
    client = Client.from_args(args, timeout=SNAPSHOT_TIMEOUT)
    params = {"audit": "false"} if args.no_audit else None
    try:
        resp = client.get("/v1/snapshot", params)
    except ApiError as exc:
        raise api_failure("Error saving snapshot", exc, client) from None
    try:
        snap = archive.unpack(resp.body)  # never leave a corrupt file behind
    except archive.SnapshotError as exc:
        raise CommandError(f"Error verifying snapshot: {exc}") from None
    target = Path(args.file)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(resp.body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise CommandError(f"Error writing snapshot file: {exc}") from None
    out(f"Saved and verified snapshot to index {snap.meta.get('Index')}")
    return 0


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"Error opening snapshot file: {exc.strerror or exc}") from None


def cmd_restore(args: argparse.Namespace) -> int:
    data = _read(args.file)
    try:
        archive.unpack(data)  # refuse a bad file before sending it
    except archive.SnapshotError as exc:
        raise CommandError(f"Error restoring snapshot: {exc}") from None
    client = Client.from_args(args, timeout=SNAPSHOT_TIMEOUT)
    try:
        client.request("PUT", "/v1/snapshot", body=data, content_type="application/octet-stream")
    except ApiError as exc:
        raise api_failure("Error restoring snapshot", exc, client) from None
    out("Restored snapshot")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    data = _read(args.file)
    try:
        snap = archive.unpack(data)
    except archive.SnapshotError as exc:
        raise CommandError(f"Error inspecting snapshot: {exc}") from None
    for line in tabulate([(" " + k, v) for k, v in archive.describe(snap, len(data))], 1):
        out(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(
        sub,
        "snapshot",
        "Save, restore and inspect snapshots of the registry's state",
        """
        $ mesh snapshot save backup.snap
        $ mesh snapshot inspect backup.snap
        $ mesh snapshot restore backup.snap
        """,
    )
    p = add_command(
        group,
        "save",
        cmd_save,
        "Save a snapshot of the whole state to FILE",
        """
Catalog, KV, sessions, ACL, intentions, config entries, CA state (private keys
still encrypted), events and the audit log, read at one point in time. The
archive is verified before the file is written. Needs a management token.""",
    )
    p.add_argument("file", metavar="FILE", help="the snapshot file to write")
    p.add_argument("-no-audit", "--no-audit", action="store_true", help="leave the audit log out")
    p = add_command(
        group,
        "restore",
        cmd_restore,
        "Replace the whole state with the snapshot in FILE",
        """
All or nothing: a truncated or corrupt file, a snapshot from a newer version or
schema is refused and nothing is changed. Needs a management token.""",
    )
    p.add_argument("file", metavar="FILE", help="the snapshot file to load")
    p = add_command(
        group,
        "inspect",
        cmd_inspect,
        "Verify a snapshot file and show what it holds (no server needed)",
    )
    p.add_argument("file", metavar="FILE", help="the snapshot file to read")
