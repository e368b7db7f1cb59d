"""`mesh kv get|put|delete`: the KV store, with consul kv's output and exit codes."""

from __future__ import annotations

import argparse
import base64
import binascii
import sys

from meshweb.commands.base import (
    ApiError,
    Client,
    CommandError,
    add_command,
    add_group,
    api_failure,
    out,
    out_bytes,
    path_escape,
    tabulate,
    uint,
)


def _kv_path(key: str) -> str:
    return "/v1/kv/" + path_escape(key)


def _strip_slash(key: str) -> str:
    # Keys cannot start with "/", but users type "/foo"; consul strips it for them.
    return key[1:] if key.startswith("/") else key


def _one_key(args: argparse.Namespace) -> str:
    if len(args.key) > 1:
        raise CommandError(f"Too many arguments (expected 1, got {len(args.key)})")
    return _strip_slash(args.key[0]) if args.key else ""


def _value(pair: dict) -> bytes:
    raw = pair.get("Value")
    return base64.b64decode(raw) if raw else b""


def _shown(pair: dict, encode: bool) -> bytes:
    value = _value(pair)
    return base64.b64encode(value) if encode else value


def _detailed(pair: dict, encode: bool) -> bytes:
    """consul kv get -detailed: a tabwriter block (padding 6), the value last."""
    rows = [
        ("CreateIndex", str(pair.get("CreateIndex", 0))),
        ("Flags", str(pair.get("Flags", 0))),
        ("Key", pair.get("Key", "")),
        ("LockIndex", str(pair.get("LockIndex", 0))),
        ("ModifyIndex", str(pair.get("ModifyIndex", 0))),
        ("Session", pair.get("Session") or "-"),
        ("Value", ""),
    ]
    text = "\n".join(tabulate(rows, padding=6))
    return text.encode() + _shown(pair, encode)


def cmd_get(args: argparse.Namespace) -> int:
    key = _one_key(args)
    if key == "" and not (args.recurse or args.keys):
        raise CommandError("Error! Missing KEY argument")
    client = Client.from_args(args)
    try:
        if args.keys:
            params = {"keys": True, "separator": args.separator or None}
            resp = client.get(_kv_path(key), params, ok=(200, 404))
            for k in (resp.json() or []) if resp.status == 200 else []:
                out(k)
            return 0
        if args.recurse:
            resp = client.get(_kv_path(key), {"recurse": True}, ok=(200, 404))
            pairs = (resp.json() or []) if resp.status == 200 else []
            for i, pair in enumerate(pairs):
                if args.detailed:
                    out_bytes(_detailed(pair, args.base64))
                    if i < len(pairs) - 1:
                        out()
                else:
                    out_bytes(pair["Key"].encode() + b":" + _shown(pair, args.base64))
            return 0
        resp = client.get(_kv_path(key), ok=(200, 404))
    except ApiError as exc:
        raise api_failure("Error querying meshweb", exc, client) from None
    pairs = resp.json() if resp.status == 200 else None
    if not pairs:
        raise CommandError(f"Error! No key exists at: {key}")
    pair = pairs[0]
    out_bytes(_detailed(pair, args.base64) if args.detailed else _shown(pair, args.base64))
    return 0


def _put_data(args: argparse.Namespace) -> tuple[str, bytes]:
    if not args.args:
        raise CommandError("Error! Missing KEY argument")
    if len(args.args) > 2:
        raise CommandError(f"Error! Too many arguments (expected 1 or 2, got {len(args.args)})")
    key = _strip_slash(args.args[0])
    data = args.args[1] if len(args.args) == 2 else ""
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise CommandError(
                f"Error! Failed to read file: open {data[1:]}: {exc.strerror or exc}"
            ) from None
    elif data == "-":
        raw = sys.stdin.buffer.read()
    else:
        raw = data.encode()
    if args.base64:
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CommandError(f"Error! Cannot base 64 decode data: {exc}") from None
    return key, raw


def cmd_put(args: argparse.Namespace) -> int:
    key, data = _put_data(args)
    if not key:
        raise CommandError("Error! Missing KEY argument")
    if (args.acquire or args.release) and not args.session:
        raise CommandError("Error! Missing -session (required with -acquire and -release)")
    if args.cas and args.modify_index == 0:
        raise CommandError("Must specify -modify-index with -cas!")
    client = Client.from_args(args)
    params: dict = {"flags": args.flags or None}
    if args.cas:
        params["cas"] = args.modify_index
    if args.acquire:
        params["acquire"] = args.session
    elif args.release:
        params["release"] = args.session
    try:
        resp = client.request("PUT", _kv_path(key), params, body=data)
    except ApiError as exc:
        raise api_failure(f"Error! Did not write to {key}", exc, client) from None
    ok = resp.json() is True
    if args.cas:
        if not ok:
            raise CommandError(f"Error! Did not write to {key}: CAS failed")
        out(f"Success! Data written to: {key}")
    elif args.acquire:
        if not ok:
            raise CommandError("Error! Did not acquire lock")
        out(f"Success! Lock acquired on: {key}")
    elif args.release:
        if not ok:
            raise CommandError("Error! Did not release lock")
        out(f"Success! Lock released on: {key}")
    else:
        if not ok:
            raise CommandError(f"Error! Did not write to {key}: the server refused the write")
        out(f"Success! Data written to: {key}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    key = _one_key(args)
    if key == "" and not args.recurse:
        raise CommandError("Error! Missing KEY argument")
    if args.cas and args.modify_index == 0:
        raise CommandError(
            "Cannot delete a key that does not exist. Provide a -modify-index greater than 0."
        )
    if args.modify_index and not args.cas:
        raise CommandError("Cannot specify -modify-index without -cas!")
    if args.recurse and args.cas:
        raise CommandError("Cannot specify both -cas and -recurse!")
    client = Client.from_args(args)
    if args.recurse:
        try:
            client.request("DELETE", _kv_path(key), {"recurse": True})
        except ApiError as exc:
            raise api_failure(f"Error! Did not delete prefix {key}", exc, client) from None
        out(f"Success! Deleted keys with prefix: {key}")
        return 0
    if args.cas:
        try:
            resp = client.request("DELETE", _kv_path(key), {"cas": args.modify_index})
        except ApiError as exc:
            raise api_failure(f"Error! Did not delete key {key}", exc, client) from None
        if resp.json() is not True:
            raise CommandError(f"Error! Did not delete key {key}: CAS failed")
        out(f"Success! Deleted key: {key}")
        return 0
    try:
        client.request("DELETE", _kv_path(key))
    except ApiError as exc:
        raise api_failure(f"Error deleting key {key}", exc, client) from None
    out(f"Success! Deleted key: {key}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    kv = add_group(
        sub,
        "kv",
        "Read, write and delete keys in the KV store",
        """
        $ mesh kv put config/redis/maxconns 5
        $ mesh kv get config/redis/maxconns
        $ mesh kv delete -recurse config/
        """,
    )

    p = add_command(
        kv,
        "get",
        cmd_get,
        "Read a value, or list keys and values under a prefix",
        """
Prints the raw value stored at KEY; exits 1 with "Error! No key exists at: KEY"
when there is none. With -recurse, prints KEY:VALUE for every key under the
prefix; with -keys, only the key names (up to the next -separator).""",
        """
        $ mesh kv get config/redis/maxconns
        $ mesh kv get -detailed config/redis/maxconns
        $ mesh kv get -recurse config/
        $ mesh kv get -keys -separator=/ config/
        """,
    )
    p.add_argument("key", nargs="*", metavar="KEY_OR_PREFIX", help="key (or prefix)")
    p.add_argument("-recurse", "--recurse", action="store_true", help="every key under the prefix")
    p.add_argument("-keys", "--keys", action="store_true", help="list key names only, not values")
    p.add_argument(
        "-separator",
        "--separator",
        default="/",
        help='with -keys, list keys only up to this separator (default "/"; "" for all)',
    )
    p.add_argument(
        "-detailed",
        "--detailed",
        action="store_true",
        help="show metadata (indexes, flags, session) beside the value",
    )
    p.add_argument("-base64", "--base64", action="store_true", help="base64-encode the value")

    p = add_command(
        kv,
        "put",
        cmd_put,
        "Write a value to a key",
        """
DATA is a literal, @FILE to read a file, or - to read stdin; without DATA the
key is written empty. With -cas, the write happens only if the key's
ModifyIndex still equals -modify-index ("Error! Did not write to KEY: CAS
failed" and exit 1 otherwise).""",
        """
        $ mesh kv put config/redis/maxconns 5
        $ mesh kv put config/program/license @license.lic
        $ echo "abcd1234" | mesh kv put config/program/license -
        $ mesh kv put -cas -modify-index=844 config/redis/maxconns 6
        $ mesh kv put -flags=42 config/feature/x on
        """,
    )
    p.add_argument("args", nargs="*", metavar="KEY [DATA]", help="key, then DATA|@FILE|-")
    p.add_argument(
        "-flags", "--flags", type=uint, default=0, help="unsigned integer flags to store"
    )
    p.add_argument("-cas", "--cas", action="store_true", help="check-and-set on -modify-index")
    p.add_argument(
        "-modify-index",
        "--modify-index",
        dest="modify_index",
        type=uint,
        default=0,
        help="the ModifyIndex a -cas write expects",
    )
    p.add_argument("-base64", "--base64", action="store_true", help="DATA is base64-encoded")
    p.add_argument("-session", "--session", help="session ID for -acquire / -release")
    p.add_argument("-acquire", "--acquire", action="store_true", help="acquire the key's lock")
    p.add_argument("-release", "--release", action="store_true", help="release the key's lock")

    p = add_command(
        kv,
        "delete",
        cmd_delete,
        "Delete a key, or every key under a prefix",
        """
Deleting a key that does not exist succeeds, as in consul. With -cas, the
delete happens only if the key's ModifyIndex still equals -modify-index.""",
        """
        $ mesh kv delete config/redis/maxconns
        $ mesh kv delete -recurse config/
        $ mesh kv delete -cas -modify-index=845 config/redis/maxconns
        """,
    )
    p.add_argument("key", nargs="*", metavar="KEY_OR_PREFIX", help="key (or prefix with -recurse)")
    p.add_argument("-recurse", "--recurse", action="store_true", help="delete the whole prefix")
    p.add_argument("-cas", "--cas", action="store_true", help="check-and-set on -modify-index")
    p.add_argument(
        "-modify-index",
        "--modify-index",
        dest="modify_index",
        type=uint,
        default=0,
        help="the ModifyIndex a -cas delete expects",
    )
