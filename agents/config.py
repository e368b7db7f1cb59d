"""The agent's configuration: flags parsed once into a frozen dataclass.

A bad value stops start-up with a message that names the flag (or the file)
at fault, before anything is started. The service definitions of the config
dir are read separately (`agents.definitions`), because SIGHUP re-reads them.
"""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

_PIN = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class ConfigError(ValueError):
    """A setting the agent cannot start with; the message names it."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything `mesh agent` was started with, validated."""

    data_dir: Path
    config_dirs: tuple[Path, ...]
    join_host: str
    join_port: int
    join_token: str  # "" once joined: the stored node certificate is enough
    ca_pin: str  # lower-case hex of the pinned root's DER SHA-256 ("" once joined)
    node: str
    bind: str  # the address other hosts reach this host's sidecars on
    http_host: str
    http_port: int
    metrics_host: str | None
    metrics_port: int
    datacenter: str  # "" until learnt from the server's certificate or the join answer
    sync_interval: float = 30.0  # anti-entropy full sync, jittered
    rtt_interval: float = 10.0  # round-trip probes for network coordinates, jittered
    rpc_timeout: float = 10.0  # deadline of every unary RPC
    sidecar_bin: str = ""  # "" finds mesh-sidecar next to the interpreter or on PATH
    log_level: str = "info"
    node_meta: tuple[tuple[str, str], ...] = ()  # -node-meta key:value, sent with the node
    replace: bool = False  # -replace: join even if a live node holds the name (it is cut off)
    # Observability: golden-metric reports, spans and access logs of the sidecars.
    traffic_report_interval: float = 10.0  # -traffic-report-interval; 0: no reports
    otlp_endpoint: str = ""  # -otlp-endpoint, passed to every sidecar ("" : theirs from env)
    trace_sample_ratio: float | None = None  # -trace-sample-ratio (None: the sidecar's default)
    access_log_dir: Path | None = None  # -access-log-dir: <dir>/<proxy_id>.log ; None: none

    @property
    def join_target(self) -> str:
        return f"{self.join_host}:{self.join_port}"

    @property
    def sidecar_dir(self) -> Path:
        return self.data_dir / "sidecars"

    @property
    def gateway_dir(self) -> Path:
        return self.data_dir / "gateways"


def split_addr(value: str, flag: str, *, default_port: int | None = None) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) with a port in range; the error names the flag."""
    text = (value or "").strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{flag}: {value!r} must be HOST:PORT")
        port_text = str(default_port)
    if not host:
        raise ConfigError(f"{flag}: {value!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{flag}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag}: port {port} is out of range")
    return host, port


def parse_duration_flag(value: str, flag: str) -> float:
    from meshproto.durations import parse_duration

    try:
        seconds = parse_duration(value if not value.replace(".", "", 1).isdigit() else value + "s")
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if seconds <= 0:
        raise ConfigError(f"{flag}: must be positive")
    return seconds


def _route_address(host: str, port: int) -> str:
    """The local address the kernel would use to reach the control plane."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def build(
    *,
    data_dir: str | None,
    config_dirs: list[str] | None,
    join: str | None,
    join_token: str | None,
    ca_pin: str | None,
    node: str | None,
    bind: str | None,
    http_addr: str | None,
    metrics_addr: str | None,
    dc: str | None,
    sync_interval: str | None = None,
    rtt_interval: str | None = None,
    rpc_timeout: str | None = None,
    sidecar_bin: str | None = None,
    log_level: str | None = None,
    node_meta: list[str] | None = None,
    replace: bool = False,
    traffic_report_interval: str | None = None,
    otlp_endpoint: str | None = None,
    trace_sample_ratio: str | None = None,
    access_log_dir: str | None = None,
) -> AgentConfig:
    """Validate the flags into an AgentConfig; raises ConfigError naming the flag."""
    if not data_dir:
        raise ConfigError("-data-dir: required (the agent keeps its identity and state there)")
    data = Path(data_dir).expanduser().resolve()
    try:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"-data-dir: cannot create {data}: {exc.strerror}") from None
    if not data.is_dir():
        raise ConfigError(f"-data-dir: {data} is not a directory")
    dirs: list[Path] = []
    for d in config_dirs or []:
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise ConfigError(f"-config-dir: {p} is not a directory")
        dirs.append(p)
    if not join:
        raise ConfigError("-join: required (the control plane's gRPC address, HOST:PORT)")
    join_host, join_port = split_addr(join, "-join", default_port=8502)
    pin = ""
    if ca_pin:
        m = _PIN.match(ca_pin.strip())
        if not m:
            raise ConfigError(
                "-ca-pin: expected sha256:<64 hex digits> (as `mesh join-token create` prints it)"
            )
        pin = m.group(1).lower()
    token = (join_token or "").strip()
    if token and not pin:
        raise ConfigError(
            "-ca-pin: required with -join-token (it is how the agent trusts the server)"
        )
    node_name = node or socket.gethostname().split(".")[0]
    if not _NODE.match(node_name):
        raise ConfigError(f"-node: {node_name!r} is not a valid node name (letters, digits, ._-)")
    if dc and not _DC.match(dc):
        raise ConfigError(f"-dc: {dc!r} is not a valid datacenter name")
    http_host, http_port = split_addr(http_addr or "127.0.0.1:8500", "-http-addr")
    metrics_host, metrics_port = None, 0
    if metrics_addr:
        metrics_host, metrics_port = split_addr(metrics_addr, "-metrics-addr")
    if bind:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in bind else socket.AF_INET, bind)
        except OSError:
            raise ConfigError(f"-bind: {bind!r} is not an IP address") from None
    bind_addr = bind or _route_address(join_host, join_port)
    level = (log_level or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"-log-level: {log_level!r} (use debug, info, warning or error)")
    meta: dict[str, str] = {}
    for item in node_meta or []:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise ConfigError(f"-node-meta: {item!r} must be key:value")
        if key == "mesh-role":
            raise ConfigError("-node-meta: mesh-role is reserved (the agent sets it)")
        meta[key] = value
    if sidecar_bin and not Path(sidecar_bin).exists():
        raise ConfigError(f"-sidecar-bin: {sidecar_bin} does not exist")
    if not traffic_report_interval:
        report_every = 10.0
    elif traffic_report_interval.strip() in ("0", "0s"):
        report_every = 0.0  # no reports
    else:
        report_every = parse_duration_flag(traffic_report_interval, "-traffic-report-interval")
    if report_every and not 1.0 <= report_every <= 300.0:
        raise ConfigError("-traffic-report-interval: between 1s and 5m (0s: no reports)")
    endpoint = (otlp_endpoint or "").strip()
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"-otlp-endpoint: {endpoint!r} is not an http(s) URL")
    ratio: float | None = None
    if trace_sample_ratio:
        try:
            ratio = float(trace_sample_ratio)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"-trace-sample-ratio: {trace_sample_ratio!r} (a number within 0..1)")
    if access_log_dir == "none":
        logs_dir = None
    else:
        logs_dir = (
            Path(access_log_dir).expanduser().resolve() if access_log_dir else data / "access-logs"
        )
    return AgentConfig(
        data_dir=data,
        config_dirs=tuple(dirs),
        join_host=join_host,
        join_port=join_port,
        join_token=token,
        ca_pin=pin,
        node=node_name,
        bind=bind_addr,
        http_host=http_host,
        http_port=http_port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        datacenter=dc or "",
        sync_interval=parse_duration_flag(sync_interval, "-sync-interval")
        if sync_interval
        else 30.0,
        rtt_interval=parse_duration_flag(rtt_interval, "-rtt-interval") if rtt_interval else 10.0,
        rpc_timeout=parse_duration_flag(rpc_timeout, "-rpc-timeout") if rpc_timeout else 10.0,
        sidecar_bin=sidecar_bin or "",
        log_level=level,
        node_meta=tuple(sorted(meta.items())),
        replace=bool(replace),
        traffic_report_interval=report_every,
        otlp_endpoint=endpoint,
        trace_sample_ratio=ratio,
        access_log_dir=logs_dir,
    )


def find_sidecar_bin(configured: str, name: str = "mesh-sidecar") -> list[str] | None:
    """The command that starts a sidecar (or, `name="mesh-gateway"`, a mesh gateway):
    -sidecar-bin, else `name` beside the interpreter, else on PATH; None when there
    is none (sockets are still served)."""
    import shutil

    if configured:
        return [configured]
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else None
