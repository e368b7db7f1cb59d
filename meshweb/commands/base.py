"""What every client command shares: the HTTP client, global options, output and errors.

The client commands are a thin HTTP client of a running control plane's
Consul-compatible `/v1` API: they never import Django nor touch a database,
so they work against any meshweb (or Consul) server. Errors surface as a
one-line message on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import ipaddress
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_HTTP_ADDR = "127.0.0.1:8500"
# A blocking-free CLI call that takes longer than this is a hung server, not a slow one.
DEFAULT_TIMEOUT = 60.0


# --------------------------------------------------------------------------- errors


class CommandError(Exception):
    """A failure to report as one line on stderr, with the command's exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ConnectError(Exception):
    """The server could not be reached (refused, unresolvable, timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Error connecting to meshweb at {url}: {reason}")
        self.url = url
        self.reason = reason


class ApiError(Exception):
    """The server answered with a non-200 status; str() reads as Consul's Go client's."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body.strip()
        detail = f" ({self.body})" if self.body else ""
        super().__init__(f"Unexpected response code: {status}{detail}")


# --------------------------------------------------------------------------- addresses


def parse_http_addr(addr: str) -> str:
    """`host:port`, `http://host:port` or `https://host:port` -> a base URL.

    Raises CommandError for what cannot be an HTTP address (a unix socket, no host).
    """
    text = addr.strip()
    if not text:
        raise CommandError("Error! -http-addr must not be empty")
    if "://" not in text:
        text = "http://" + text
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https"):
        raise CommandError(
            f"Error! Unsupported scheme in -http-addr {addr!r}: use host:port, http:// or https://"
        )
    try:
        port = parsed.port
    except ValueError:
        raise CommandError(f"Error! Invalid port in -http-addr {addr!r}") from None
    if not parsed.hostname:
        raise CommandError(f"Error! Missing host in -http-addr {addr!r}")
    host = parsed.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None:
        port = 443 if parsed.scheme == "https" else 8500
    return f"{parsed.scheme}://{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- client


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            raise ApiError(self.status, "response is not valid JSON") from None


class Client:
    """A minimal Consul-style HTTP client: token header, `?dc=`, plain-text errors.

    Every method raises ConnectError when the server cannot be reached and
    ApiError for a status other than 200 unless the caller lists it in `ok`.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        datacenter: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url
        self.token = token or None
        self.datacenter = datacenter or None
        self.timeout = timeout
        host = urllib.parse.urlsplit(base_url).hostname or ""
        # Environment proxies never apply to a control plane on this host.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_args(cls, args: argparse.Namespace, timeout: float = DEFAULT_TIMEOUT) -> Client:
        return cls(
            parse_http_addr(resolve_http_addr(args)),
            token=resolve_token(args),
            datacenter=getattr(args, "datacenter", None)
            or os.environ.get("MESH_DATACENTER")
            or None,
            timeout=timeout,
        )

    @classmethod
    def for_api(cls, args: argparse.Namespace) -> Client:
        """A client of the `/api` REST API, which takes no `?dc=` (a datacenter goes in bodies)."""
        client = cls.from_args(args)
        client.datacenter = None
        return client

    def request(
        self,
        method: str,
        path: str,
        params: Iterable[tuple[str, Any]] | dict[str, Any] | None = None,
        body: bytes | None = None,
        ok: Sequence[int] = (200,),
        content_type: str | None = None,
    ) -> Response:
        query: list[str] = []
        items = list(params.items() if isinstance(params, dict) else (params or []))
        if self.datacenter:
            items.append(("dc", self.datacenter))
        for name, value in items:
            if value is None or value is False:
                continue
            if value is True:  # a bare `?recurse`, as Consul's client sends it
                query.append(urllib.parse.quote(name))
            else:
                query.append(
                    f"{urllib.parse.quote(name)}={urllib.parse.quote(str(value), safe='')}"
                )
        url = self.base_url + path
        if query:
            url += "?" + "&".join(query)
        headers = {"User-Agent": "mesh-cli"}
        if self.token:
            headers["X-Consul-Token"] = self.token
        if content_type:  # /api parses bodies by type (urllib would say form-urlencoded)
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status, hdrs, data = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            status, hdrs = exc.code, dict(exc.headers or {})
            try:
                data = exc.read()
            except (OSError, http.client.HTTPException):
                data = b""
        except urllib.error.URLError as exc:
            raise ConnectError(self.base_url, _reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectError(self.base_url, _reason(exc)) from None
        if status not in ok:
            raise ApiError(status, data.decode("utf-8", "replace")[:2000])
        return Response(status, hdrs, data)

    def get(self, path: str, params=None, ok: Sequence[int] = (200,)) -> Response:
        return self.request("GET", path, params, ok=ok)

    def get_json(self, path: str, params=None) -> Any:
        return self.get(path, params).json()

    def put_json(self, path: str, payload: Any, params=None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        return self.request("PUT", path, params, body=body).json()

    def post_json(self, path: str, payload: Any, ok: Sequence[int] = (200,)) -> Any:
        """POST `payload` as JSON (no body for None) and decode the answer."""
        body = json.dumps(payload).encode() if payload is not None else None
        content_type = "application/json" if body is not None else None
        return self.request("POST", path, body=body, ok=ok, content_type=content_type).json()


def _reason(reason: object) -> str:
    if isinstance(reason, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def path_escape(segment: str) -> str:
    """A key or name as a URL path, slashes kept (Consul's keys contain them)."""
    return urllib.parse.quote(segment, safe="/")


# --------------------------------------------------------------------------- global options


def resolve_http_addr(args: argparse.Namespace) -> str:
    return (
        getattr(args, "http_addr", None)
        or os.environ.get("MESH_HTTP_ADDR")
        or os.environ.get("CONSUL_HTTP_ADDR")
        or DEFAULT_HTTP_ADDR
    )


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise CommandError(f"Error reading token file {path}: {exc.strerror or exc}") from None


def resolve_token(args: argparse.Namespace) -> str | None:
    """Consul's order: -token, -token-file, then the environment's token, then its file."""
    if getattr(args, "token", None):
        return args.token
    if getattr(args, "token_file", None):
        return _read_token_file(args.token_file)
    for name in ("MESH_HTTP_TOKEN", "CONSUL_HTTP_TOKEN"):
        if os.environ.get(name):
            return os.environ[name]
    for name in ("MESH_HTTP_TOKEN_FILE", "CONSUL_HTTP_TOKEN_FILE"):
        if os.environ.get(name):
            return _read_token_file(os.environ[name])
    return None


def global_options() -> argparse.ArgumentParser:
    """The options every client command takes, as consul's (single or double dash)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("HTTP API options")
    g.add_argument(
        "-http-addr",
        "--http-addr",
        dest="http_addr",
        metavar="ADDR",
        help="address of the meshweb server, host:port or http(s)://host:port "
        f"(env MESH_HTTP_ADDR, then CONSUL_HTTP_ADDR; default {DEFAULT_HTTP_ADDR})",
    )
    g.add_argument(
        "-token",
        "--token",
        dest="token",
        metavar="SECRET",
        help="ACL token secret to use (env MESH_HTTP_TOKEN, then CONSUL_HTTP_TOKEN)",
    )
    g.add_argument(
        "-token-file",
        "--token-file",
        dest="token_file",
        metavar="PATH",
        help="file holding the ACL token secret (env MESH_HTTP_TOKEN_FILE, then CONSUL_HTTP_TOKEN_FILE)",
    )
    g.add_argument(
        "-datacenter",
        "--datacenter",
        dest="datacenter",
        metavar="DC",
        help="datacenter to query (default: the server's own)",
    )
    return p


# --------------------------------------------------------------------------- parsers


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


class CommandParser(argparse.ArgumentParser):
    """A command's parser: an unknown flag is reported with *this* command's usage.

    (Plain argparse leaves unknown arguments to the top-level parser, whose
    usage line, `mesh [-h] <command> ...`, does not help.)
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras


def _add_parser(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> CommandParser:
    # add_parser() builds its subparsers' class; `mesh`'s own is plain ArgumentParser.
    saved = sub._parser_class
    sub._parser_class = CommandParser
    try:
        return sub.add_parser(name, **kwargs)
    finally:
        sub._parser_class = saved


def add_group(
    sub: argparse._SubParsersAction, name: str, synopsis: str, examples: str = ""
) -> argparse._SubParsersAction:
    """A command group (`mesh kv`, `mesh acl token`) whose subcommand is required."""
    p = _add_parser(
        sub,
        name,
        help=synopsis,
        description=synopsis,
        epilog=_examples(examples),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    group = p.add_subparsers(dest=f"{p.prog.replace(' ', '_')}_command", metavar="<subcommand>")

    def usage(_args: argparse.Namespace) -> int:
        # `mesh acl` alone: show what the group offers (as consul does), and fail.
        p.print_help(sys.stderr)
        return 1

    p.set_defaults(func=usage)
    return group


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    synopsis: str,
    details: str = "",
    examples: str = "",
) -> argparse.ArgumentParser:
    """A leaf command: global options included, errors turned into exit codes."""
    p = _add_parser(
        sub,
        name,
        help=synopsis,
        description=synopsis + ("\n\n" + details.strip("\n") if details else ""),
        epilog=_examples(examples),
        formatter_class=_HelpFormatter,
        parents=[global_options()],
        allow_abbrev=False,
    )
    p.set_defaults(func=_guarded(func))
    return p


def _examples(text: str) -> str | None:
    if not text:
        return None
    lines = [line.strip() for line in text.strip("\n").splitlines()]
    return "examples:\n" + "\n".join(f"  {line}" if line else "" for line in lines)


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args) or 0)
        except ConnectError as exc:
            error(str(exc))
            return 1
        except CommandError as exc:
            error(exc.message)
            return exc.code
        except ApiError as exc:  # a command that does not word its own failure
            error(f"Error: {exc}")
            return 1
        except Exception as exc:
            # A bug of ours still ends in one line, not a traceback (MESH_CLI_DEBUG=1 shows it).
            if os.environ.get("MESH_CLI_DEBUG"):
                raise
            error(f"Error: unexpected {type(exc).__name__}: {exc}")
            return 1
        except BrokenPipeError:
            # `mesh kv get -recurse | head`: the reader left; that is not our failure.
            # Point stdout at /dev/null so the interpreter's final flush stays quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0

    return run


def api_failure(prefix: str, exc: ApiError, client: Client | None = None) -> CommandError:
    """`<prefix>: Unexpected response code: 403 (...)`, with a hint for a missing token."""
    message = f"{prefix}: {exc}"
    if exc.status == 403 and client is not None and not client.token:
        message += "\n(no ACL token given: pass -token or set MESH_HTTP_TOKEN)"
    return CommandError(message)


def api_message(exc: ApiError) -> ApiError:
    """/api errors are JSON (`{"error": "..."}`): keep the message only, as /v1's plain text."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return ApiError(exc.status, json.loads(exc.body)["error"])
    return exc


def get_or_fail(client: Client, path: str, prefix: str, params=None, *, api: bool = False) -> Any:
    """GET `path` as JSON; a failure becomes `<prefix>: ...` (`api`: an /api path,
    whose JSON error is unwrapped first)."""
    try:
        return client.get_json(path, params)
    except ApiError as exc:
        raise api_failure(prefix, api_message(exc) if api else exc, client) from None


def filtered_by_acls(resp: Response) -> bool:
    """The server left results out because the token may not see them (Consul's header)."""
    wanted = "x-consul-results-filtered-by-acls"
    return any(k.lower() == wanted and v.lower() == "true" for k, v in resp.headers.items())


def report_nothing(what: str, resp: Response, client: Client) -> int:
    """Say why a listing is empty; the exit code.

    "No <what> match" when there are none; when ACLs hid some and no token
    was given, say that instead (and fail: the answer is not "none").
    """
    if filtered_by_acls(resp):
        if not client.token:
            error(
                f"No {what} visible: ACLs are enabled and no token was given "
                "(set MESH_HTTP_TOKEN or -token)"
            )
            return 1
        error(f"No {what} visible to this token: ACLs hid some from it.")
        return 0
    error(f"No {what} match the given query - try expanding your search.")
    return 0


# --------------------------------------------------------------------------- flag value types


def uint(text: str) -> int:
    """An unsigned integer flag value (Go's Uint64Var)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid unsigned integer {text!r}") from None
    if value < 0 or value >= 2**64:
        raise argparse.ArgumentTypeError(f"invalid unsigned integer {text!r}")
    return value


def key_value(text: str) -> tuple[str, str]:
    """A `key=value` flag value (consul's -node-meta, -meta)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def add_format_option(
    p: argparse.ArgumentParser,
    choices: Sequence[str] = ("pretty", "json"),
    help: str = "output format: pretty or json (default pretty)",
) -> None:
    """`-format`: the first choice is the default (consul's `pretty`, or `text` for tables)."""
    p.add_argument(
        "-format", "--format", dest="format", choices=tuple(choices), default=choices[0], help=help
    )


def add_name_option(
    p: argparse.ArgumentParser, help: str, *, required: bool = False, default: str | None = None
) -> None:
    """`-name NAME`, the object a command acts on."""
    p.add_argument(
        "-name",
        "--name",
        dest="name",
        required=required,
        default=default,
        metavar="NAME",
        help=help,
    )


def add_meta_option(p: argparse.ArgumentParser, help: str) -> None:
    """`-meta KEY=VALUE`, repeatable: metadata to set (a list of pairs)."""
    p.add_argument(
        "-meta",
        "--meta",
        dest="meta",
        type=key_value,
        action="append",
        metavar="KEY=VALUE",
        help=help,
    )


# --------------------------------------------------------------------------- output


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def out_bytes(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.buffer.flush()


def error(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def out_json(data: Any) -> None:
    """As Go's json.MarshalIndent(v, "", "    ")."""
    out(json.dumps(data, indent=4, ensure_ascii=False))


def out_json_or_none(args: argparse.Namespace, rows: Sequence[Any], none: str) -> bool:
    """A listing's shared start: the rows as JSON under `-format json`, or the `none`
    line when there are no rows. True when that said it all."""
    if args.format == "json":
        out_json(rows)
        return True
    if not rows:
        out(none)
        return True
    return False


def columnize(rows: Sequence[Sequence[str]], glue: str = "  ") -> str:
    """Columns padded to their widest cell, the last one unpadded (ryanuber/columnize)."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [0] * ncols
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in rows:
        cells = [cell if i == len(row) - 1 else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append(glue.join(cells).rstrip())
    return "\n".join(lines)


def tabulate(rows: Sequence[Sequence[str]], padding: int) -> list[str]:
    """Go's tabwriter with minwidth 0 and `padding`: every cell but the last padded."""
    ncols = max((len(r) for r in rows), default=0)
    widths = [0] * ncols
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell) + padding)
    return ["".join(c.ljust(widths[i]) for i, c in enumerate(row[:-1])) + row[-1] for row in rows]


def load_data_source(value: str, what: str) -> str:
    """Consul's `@file`, `-` (stdin) or literal value convention."""
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CommandError(
                f"Error loading {what}: Failed to read file: {reason}: {value[1:]}"
            ) from None
    if value == "-":
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise CommandError(f"Error loading {what}: Failed to read stdin: {exc}") from None
    return value
