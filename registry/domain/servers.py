"""The server processes of this control plane, as they report themselves.

meshweb has no Raft: every `mesh server` process serves reads and writes
against the one shared database (and Redis for change fan-out), so "the
servers" are simply the processes running. Each records itself on start,
refreshes `last_seen_at` every `HEARTBEAT_SECONDS` and removes itself on a
clean stop; one not seen for `DEAD_AFTER_SECONDS` is reported unhealthy and
forgotten after `FORGET_AFTER_SECONDS`. The `/v1/status/peers`,
`/v1/operator/raft/configuration` and `/v1/operator/autopilot/health`
answers are made from this table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from meshproto.registration import shapes
from registry import db
from registry.models import ServerProcess

log = logging.getLogger("meshweb.server")

HEARTBEAT_SECONDS = 5.0
DEAD_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS
FORGET_AFTER_SECONDS = 3600.0

PROCESS_ID = str(uuid.uuid4())
STARTED_AT = timezone.now()


def _addr(addr: tuple[str, int] | None) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else ""


def own_http_addr() -> str:
    return _addr(settings.MESH_HTTP_ADDR)


def beat() -> None:
    """Record (or refresh) this process; forget processes long gone."""
    now = timezone.now()
    ServerProcess.objects.update_or_create(
        id=PROCESS_ID,
        defaults={
            "node": settings.MESH_NODE_NAME,
            "datacenter": settings.MESH_DC,
            "http_addr": own_http_addr(),
            "grpc_addr": _addr(settings.MESH_GRPC_ADDR),
            "hostname": socket.gethostname()[:255],
            "pid": os.getpid(),
            "version": shapes.VERSION,
            "started_at": STARTED_AT,
            "last_seen_at": now,
        },
    )
    ServerProcess.objects.filter(
        last_seen_at__lt=now - timedelta(seconds=FORGET_AFTER_SECONDS)
    ).delete()


def leave() -> None:
    ServerProcess.objects.filter(id=PROCESS_ID).delete()


async def heartbeat() -> None:
    """The server's background task: beat until cancelled, then leave."""
    try:
        while True:
            try:
                await db.run_detached(beat)
            except Exception as exc:  # a database outage must not end the task
                log.warning("server heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(db.run_detached(leave), 2.0)


def processes() -> list[ServerProcess]:
    """Every known process, this one included (recorded now if it was not yet)."""
    if not ServerProcess.objects.filter(id=PROCESS_ID).exists():
        beat()
    return list(ServerProcess.objects.order_by("started_at", "id"))


def alive(p: ServerProcess) -> bool:
    return (timezone.now() - p.last_seen_at).total_seconds() <= DEAD_AFTER_SECONDS


def peers() -> list[str]:
    """`/v1/status/peers`: the HTTP address of every live server process."""
    return [p.http_addr for p in processes() if alive(p)]


def raft_configuration(index: int) -> dict[str, Any]:
    """Consul's raft configuration shape, describing the processes as they are:
    all equal voters on one database; `Leader` marks the process answering."""
    return {
        "Servers": [
            {
                "ID": p.id,
                "Node": p.node,
                "Address": p.http_addr,
                "Leader": p.id == PROCESS_ID,
                "ProtocolVersion": "3",
                "Voter": True,
                "Meta": {"hostname": p.hostname, "pid": str(p.pid), "grpc_addr": p.grpc_addr},
            }
            for p in processes()
            if alive(p)
        ],
        "Index": index,
    }


def _go_duration(seconds: float) -> str:
    return f"{seconds:.3f}s".replace(".000s", "s")


def autopilot_health(index: int) -> dict[str, Any]:
    """Consul's autopilot health: healthy while at least one process is; any one can
    serve alone (they share the database), so the failure tolerance is the healthy
    processes but one."""
    now = timezone.now()
    servers = []
    for p in processes():
        healthy = alive(p)
        servers.append(
            {
                "ID": p.id,
                "Name": p.node,
                "Address": p.http_addr,
                "SerfStatus": "alive" if healthy else "failed",
                "Version": p.version,
                "Leader": p.id == PROCESS_ID,
                "LastContact": _go_duration((now - p.last_seen_at).total_seconds()),
                "LastTerm": 0,
                "LastIndex": index,
                "Healthy": healthy,
                "Voter": True,
                "StableSince": p.started_at.isoformat(),
            }
        )
    healthy_count = sum(1 for s in servers if s["Healthy"])
    return {
        "Healthy": healthy_count > 0 and healthy_count == len(servers),
        "FailureTolerance": max(healthy_count - 1, 0),
        "Servers": servers,
    }


# --- /v1/agent/host ----------------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def _cpus() -> list[dict[str, Any]]:
    cpus: list[dict[str, Any]] = []
    current: dict[str, str] = {}
    with open("/proc/cpuinfo") as f:
        for line in [*f, "\n"]:
            if not line.strip():
                if current:
                    cpus.append(
                        {
                            "cpu": len(cpus),
                            "vendorId": current.get("vendor_id", ""),
                            "family": current.get("cpu family", ""),
                            "model": current.get("model", ""),
                            "modelName": current.get("model name", ""),
                            "mhz": float(current.get("cpu MHz", 0) or 0),
                            "cores": int(current.get("cpu cores", 1) or 1),
                            "flags": current.get("flags", "").split(),
                        }
                    )
                current = {}
                continue
            key, _, value = line.partition(":")
            current[key.strip()] = value.strip()
    return cpus


def host_info() -> dict[str, Any]:
    """Consul's `/v1/agent/host` shape for the machine this server process runs on,
    read from `/proc`, `uname` and the data dir's filesystem; a part that cannot be
    read is left empty and named in `Errors`."""
    import platform
    import shutil
    import time

    errors: list[str] = []
    out: dict[str, Any] = {"Memory": {}, "CPU": [], "Host": {}, "Disk": {}}
    try:
        mem = _meminfo()
        total, available = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
        out["Memory"] = {
            "total": total,
            "available": available,
            "used": total - available,
            "usedPercent": round(100.0 * (total - available) / total, 2) if total else 0.0,
            "free": mem.get("MemFree", 0),
        }
    except OSError as exc:
        errors.append(f"memory: {exc}")
    try:
        out["CPU"] = _cpus()
    except OSError as exc:
        errors.append(f"cpu: {exc}")
    uname = platform.uname()
    host: dict[str, Any] = {
        "hostname": uname.node,
        "os": uname.system.lower(),
        "platform": platform.freedesktop_os_release().get("ID", "")
        if hasattr(platform, "freedesktop_os_release")
        else "",
        "kernelVersion": uname.release,
        "kernelArch": uname.machine,
        "procs": sum(1 for p in os.listdir("/proc") if p.isdigit())
        if os.path.isdir("/proc")
        else 0,
    }
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        host["uptime"] = int(uptime)
        host["bootTime"] = int(time.time() - uptime)
    except OSError as exc:
        errors.append(f"uptime: {exc}")
    out["Host"] = host
    try:
        path = str(settings.DATA_DIR)
        usage = shutil.disk_usage(path)
        out["Disk"] = {
            "path": path,
            "total": usage.total,
            "free": usage.free,
            "used": usage.used,
            "usedPercent": round(100.0 * usage.used / usage.total, 2) if usage.total else 0.0,
        }
    except (OSError, AttributeError) as exc:
        errors.append(f"disk: {exc}")
    out["CollectionTime"] = time.time_ns()
    out["Errors"] = errors or None
    return out
