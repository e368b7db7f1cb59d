"""Sidecar processes and the Unix sockets that feed them.

For every connect-proxy on this host the agent serves
`<data-dir>/sidecars/<proxy_id>.sock` (0600) and runs one
`mesh-sidecar --proxy-id ID --socket PATH --metrics-addr 127.0.0.1:PORT`.

The protocol is JSON lines. The agent sends, whenever any part changed (and
on every new connection), one line with everything the sidecar enforces:

    {"config": <ProxyConfig JSON>, "cert": PEM, "key": PEM, "roots": [PEM, ...],
     "cert_not_after": <unix seconds>}

and the sidecar answers each line with `{"ack": <config version>}` or
`{"nack": <config version>, "error": "..."}`. The agent forwards acks and
nacks to the control plane; after a nack it keeps the last acked config as
the one it hands to a (re)connecting sidecar.

Processes are restarted with backoff when they exit and stopped on agent
shutdown (SIGTERM, a grace period, SIGKILL). A sidecar left running by an
agent that died is adopted (its pid file says which) rather than duplicated:
it kept serving meanwhile and reconnects to the new socket by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.client import Backoff

log = logging.getLogger("mesh.agent.sidecars")

MAX_LINE = 1 << 20  # an ack/nack line is small; anything bigger is garbage
GRACE_SECONDS = 3.0  # after SIGTERM, before SIGKILL (the agent's stop is bounded)

AckHandler = Callable[[str, int, bool, str], None]


@dataclass(frozen=True)
class Bundle:
    """What one sidecar enforces: its config plus its key material."""

    config: dict[str, Any]  # ProxyConfig JSON
    version: int
    cert: str
    key: str
    roots: tuple[str, ...]
    cert_not_after: float

    def line(self) -> bytes:
        if not self.key:  # a mesh gateway's feed: it holds no key material
            return json.dumps({"config": self.config}, separators=(",", ":")).encode() + b"\n"
        return (
            json.dumps(
                {
                    "config": self.config,
                    "cert": self.cert,
                    "key": self.key,
                    "roots": list(self.roots),
                    "cert_not_after": self.cert_not_after,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )


class SidecarFeed:
    """One proxy's Unix socket: the current bundle out, acks and nacks in."""

    def __init__(
        self, proxy_id: str, path: Path, on_ack: AckHandler, keyless: bool = False
    ) -> None:
        self.proxy_id = proxy_id
        self.keyless = keyless  # a mesh gateway: config only, never a leaf
        self.path = path
        self.on_ack = on_ack
        self.server: asyncio.base_events.Server | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.config: dict[str, Any] | None = None
        self.version = 0
        self.good_config: dict[str, Any] | None = None  # the last one a sidecar acked
        self.good_version = 0
        self.leaf: tuple[str, str, float] | None = None  # cert, key, not_after
        self.roots: tuple[str, ...] = ()
        self.sent: bytes = b""
        self.connected = False
        self.recent: dict[int, dict[str, Any]] = {}

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.writer is not None:
            self.writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # --- what the agent feeds in ---------------------------------------------------

    def set_config(self, config: dict[str, Any], version: int) -> None:
        self.config, self.version = config, version
        # Acks may come after newer versions were sent: remember what each version was.
        self.recent[version] = config
        while len(self.recent) > 8:
            self.recent.pop(next(iter(self.recent)))
        self.push()

    def set_leaf(self, cert: str, key: str, not_after: float) -> None:
        self.leaf = (cert, key, not_after)
        self.push()

    def set_roots(self, roots: tuple[str, ...]) -> None:
        self.roots = roots
        self.push()

    def bundle(self) -> Bundle | None:
        if self.config is not None and self.keyless:
            return Bundle(self.config, self.version, "", "", (), 0.0)
        if self.config is None or self.leaf is None:
            return None
        roots = tuple(self.config.get("roots") or ()) or self.roots
        cert, key, not_after = self.leaf
        return Bundle(self.config, self.version, cert, key, roots, not_after)

    def push(self) -> None:
        """Send the current bundle to the connected sidecar when it differs from the last."""
        b = self.bundle()
        if b is None or self.writer is None:
            return
        line = b.line()
        if line == self.sent:
            return
        self.sent = line
        try:
            self.writer.write(line)
        except (ConnectionError, RuntimeError):
            self.writer = None

    # --- the sidecar's side ---------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One sidecar per proxy: a new connection replaces the old one.
        if self.writer is not None:
            self.writer.close()
        self.writer, self.sent, self.connected = writer, b"", True
        log.info("sidecar connected", extra={"proxy_id": self.proxy_id})
        self.push()
        try:
            while True:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    log.warning("sidecar sent an oversized line", extra={"proxy_id": self.proxy_id})
                    break
                if not raw:
                    break
                self._answer(raw)
        except (ConnectionError, OSError):
            pass
        finally:
            if self.writer is writer:
                self.writer, self.connected = None, False
            writer.close()
            log.info("sidecar disconnected", extra={"proxy_id": self.proxy_id})

    def _answer(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            log.warning("sidecar sent a line that is not JSON", extra={"proxy_id": self.proxy_id})
            return
        if not isinstance(msg, dict):
            return
        if isinstance(msg.get("ack"), int):
            version = msg["ack"]
            if version in self.recent and version >= self.good_version:
                self.good_config, self.good_version = self.recent[version], version
            self.on_ack(self.proxy_id, version, True, "")
        elif "nack" in msg:
            # `null`: the sidecar could not even tell which version (a garbled line).
            version = msg["nack"] if isinstance(msg["nack"], int) else self.version
            error = str(msg.get("error") or "rejected")
            log.warning(
                "sidecar rejected config",
                extra={"proxy_id": self.proxy_id, "version": version, "error": error},
            )
            if version == self.version and self.good_config is not None:
                # Keep handing out the last good config (a restarted sidecar gets it).
                self.config, self.version = self.good_config, self.good_version
                bundle = self.bundle()
                self.sent = bundle.line() if bundle else b""
            self.on_ack(self.proxy_id, version, False, error)


# sockaddr_un holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


def socket_path(directory: Path, proxy_id: str) -> Path:
    """`<directory>/<proxy_id>.sock`, or, when that is longer than a Unix socket path may
    be, the same name in a private directory under the runtime dir named for `directory`."""
    path = directory / f"{proxy_id}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    import hashlib
    import tempfile

    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    digest = hashlib.sha256(os.fsencode(directory.resolve())).hexdigest()[:12]
    short = base / f"mesh-agent-{os.getuid()}-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    if short.stat().st_uid != os.getuid() or short.stat().st_mode & 0o077:
        raise OSError(f"{short} is not a private directory of this user")
    name = f"{proxy_id}.sock"
    if len(os.fsencode(short / name)) > MAX_SOCKET_PATH:
        name = hashlib.sha256(proxy_id.encode()).hexdigest()[:16] + ".sock"
    return short / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SidecarProcess:
    """One `mesh-sidecar` child: started, restarted with backoff, stopped with grace."""

    def __init__(
        self,
        proxy_id: str,
        command: list[str],
        socket_path: Path,
        state_dir: Path,
        extra_args: list[str] | None = None,
    ) -> None:
        self.proxy_id = proxy_id
        self.command = command
        self.extra_args = extra_args or []  # observability flags (`Sidecars.args_for`)
        self.socket_path = socket_path
        self.pid_path = state_dir / f"{proxy_id}.pid"
        self.log_path = state_dir / f"{proxy_id}.log"
        self.metrics_port = 0
        self.adopted = False  # a sidecar a previous agent started (and reported on)
        self.pid: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.stopping = False
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"sidecar:{self.proxy_id}"
        )

    def _adoptable(self) -> tuple[int, int] | None:
        """(pid, metrics port) of a sidecar for this proxy left by a previous agent."""
        try:
            data = json.loads(self.pid_path.read_text())
            pid, port = int(data["pid"]), int(data["metrics_port"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError):
            return None
        if self.proxy_id.encode() not in cmdline or str(self.socket_path).encode() not in cmdline:
            return None  # the pid was reused by something else
        return pid, port

    async def _run(self) -> None:
        backoff = Backoff(base=0.5, cap=30.0)
        adopted = self._adoptable()
        if adopted is not None:
            self.pid, self.metrics_port = adopted
            # Its counters include what a previous agent already reported.
            self.adopted = True
            log.info("adopted running sidecar", extra={"proxy_id": self.proxy_id, "pid": self.pid})
            while not self.stopping and _alive(self.pid):
                await asyncio.sleep(1.0)
        while not self.stopping:
            self.metrics_port = self.metrics_port or free_port()
            argv = [
                *self.command,
                "--proxy-id",
                self.proxy_id,
                "--socket",
                str(self.socket_path),
                "--metrics-addr",
                f"127.0.0.1:{self.metrics_port}",
                *self.extra_args,
            ]
            started = time.monotonic()
            try:
                with open(self.log_path, "ab") as logf:
                    self.proc = await asyncio.create_subprocess_exec(
                        *argv,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=logf,
                        stderr=logf,
                        start_new_session=True,  # a Ctrl-C to the agent's group is the agent's
                    )
            except OSError as exc:
                log.error(
                    "cannot start sidecar",
                    extra={"proxy_id": self.proxy_id, "error": str(exc), "argv": argv},
                )
                await asyncio.sleep(backoff.next())
                continue
            self.pid = self.proc.pid
            self.pid_path.write_text(
                json.dumps({"pid": self.pid, "metrics_port": self.metrics_port})
            )
            log.info("sidecar started", extra={"proxy_id": self.proxy_id, "pid": self.pid})
            code = await self.proc.wait()
            if self.stopping:
                break
            self.restarts += 1
            if time.monotonic() - started > 30:
                backoff.reset()
            delay = backoff.next()
            log.warning(
                "sidecar exited; restarting",
                extra={"proxy_id": self.proxy_id, "code": code, "restart_in_s": round(delay, 2)},
            )
            # A port taken by someone else is a common reason to exit: take a new one.
            self.metrics_port = 0
            await asyncio.sleep(delay)

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        self.stopping = True
        pid = self.pid
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _alive(pid):
                if self.proc is not None and self.proc.returncode is None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.proc.wait(), 0.1)
                else:
                    await asyncio.sleep(0.1)
            if _alive(pid):
                log.warning("sidecar ignored SIGTERM; killing", extra={"proxy_id": self.proxy_id})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if self.proc is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.proc.wait(), 2)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (exited, not yet reaped) is not alive for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Sidecars:
    """The feeds and processes of the proxies on this host, kept equal to the local state.
    With `keyless`, the mesh gateways': their feeds carry configs only."""

    def __init__(
        self,
        directory: Path,
        command: list[str] | None,
        on_ack: AckHandler,
        *,
        otlp_endpoint: str = "",
        trace_sample_ratio: float | None = None,
        access_log_dir: Path | None = None,
        keyless: bool = False,
        what: str = "mesh-sidecar",
    ) -> None:
        self.dir = directory
        self.command = command
        self.on_ack = on_ack
        self.otlp_endpoint = otlp_endpoint
        self.trace_sample_ratio = trace_sample_ratio
        self.access_log_dir = access_log_dir
        self.keyless = keyless
        self.what = what
        self.feeds: dict[str, SidecarFeed] = {}
        self.procs: dict[str, SidecarProcess] = {}

    def args_for(self, proxy_id: str) -> list[str]:
        """The observability flags of one sidecar (unset ones: the sidecar's own defaults)."""
        args: list[str] = []
        if self.otlp_endpoint:
            args += ["--otlp-endpoint", self.otlp_endpoint]
        if self.trace_sample_ratio is not None:
            args += ["--trace-sample-ratio", repr(self.trace_sample_ratio)]
        if self.access_log_dir is not None:
            args += ["--access-log", str(self.access_log_dir / f"{proxy_id}.log")]
        return args

    async def ensure(self, proxy_ids: set[str]) -> tuple[set[str], set[str]]:
        """Start what is new, stop what is gone; returns (added, removed)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        added = proxy_ids - set(self.feeds)
        removed = set(self.feeds) - proxy_ids
        for pid in sorted(removed):
            proc = self.procs.pop(pid, None)
            if proc is not None:
                await proc.stop()
            await self.feeds.pop(pid).close()
        for pid in sorted(added):
            path = socket_path(self.dir, pid)
            if path.parent != self.dir:
                log.info("socket path shortened", extra={"proxy_id": pid, "socket": str(path)})
            feed = SidecarFeed(pid, path, self.on_ack, keyless=self.keyless)
            try:
                await feed.start()
            except OSError as exc:
                log.error(
                    "cannot serve the sidecar socket", extra={"proxy_id": pid, "error": str(exc)}
                )
                continue
            self.feeds[pid] = feed
            if self.command:
                proc = SidecarProcess(pid, self.command, feed.path, self.dir, self.args_for(pid))
                proc.start()
                self.procs[pid] = proc
        if added and not self.command:
            log.warning(
                f"{self.what} not found: serving its sockets without starting processes",
                extra={"proxies": sorted(added)},
            )
        return added, removed

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs.values()), return_exceptions=True)
        for feed in self.feeds.values():
            await feed.close()
        self.procs.clear()
        self.feeds.clear()
