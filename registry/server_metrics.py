"""The control plane's own health and metrics: is it able to write, and how is it doing.

Served by `GET /v1/agent/metrics` (Consul's JSON shape, or Prometheus text
with `?format=prometheus`) and `GET /v1/agent/health` (200 when healthy,
503 when not; no token needed, for load balancers and probes). A writer
that died and was restarted, writes that fail, a growing write queue or an
unreachable database show up here first.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from django.db import connection

from registry import db
from registry.changes import hub


@dataclass(frozen=True)
class Metric:
    """One value: a gauge (a level now) or a counter (a total since the process started)."""

    name: str  # dotted, as Consul's: "mesh.writer.restarts"
    kind: str  # "gauge" | "counter"
    value: float
    help: str
    labels: dict[str, str] = field(default_factory=dict)


def snapshot() -> list[Metric]:
    """The current values. Call on the event loop's thread (the change hub lives there)."""
    stats = db.writer.stats
    return [
        Metric("mesh.writer.alive", "gauge", float(db.writer.alive), "1 while the writer runs"),
        Metric(
            "mesh.writer.queue_depth",
            "gauge",
            db.writer.queue_depth(),
            "writes waiting for the writer",
        ),
        Metric(
            "mesh.writer.restarts",
            "counter",
            stats.restarts,
            "times the writer thread was found stopped and started again",
        ),
        Metric(
            "mesh.writer.batches_committed",
            "counter",
            stats.batches_committed,
            "write batches committed",
        ),
        Metric(
            "mesh.writer.batches_failed",
            "counter",
            stats.batches_failed,
            "write batches that failed as a whole (database errors)",
        ),
        Metric(
            "mesh.writer.batch_retries",
            "counter",
            stats.batch_retries,
            "batches run again after losing their database connection",
        ),
        Metric(
            "mesh.writer.batch_redos",
            "counter",
            stats.batch_redos,
            "batches run again with a savepoint per write after a write failed",
        ),
        Metric(
            "mesh.writer.writes_committed",
            "counter",
            stats.writes_committed,
            "writes committed",
        ),
        Metric(
            "mesh.writer.writes_failed",
            "counter",
            stats.writes_failed,
            "writes that failed (refused or rolled back)",
        ),
        Metric(
            "mesh.blocking_queries.waiting",
            "gauge",
            hub.waiting(),
            "blocking queries waiting for a change",
        ),
    ]


def consul_json(metrics: list[Metric], now: dt.datetime | None = None) -> dict[str, Any]:
    """Consul's `/v1/agent/metrics` shape (go-metrics' in-memory sink summary)."""
    now = now or dt.datetime.now(dt.UTC)
    gauges, counters = [], []
    for m in metrics:
        if m.kind == "gauge":
            gauges.append({"Name": m.name, "Value": m.value, "Labels": dict(m.labels)})
        else:
            counters.append(
                {
                    "Name": m.name,
                    "Count": int(m.value),
                    "Rate": 0.0,
                    "Sum": m.value,
                    "Min": m.value,
                    "Max": m.value,
                    "Mean": m.value,
                    "Stddev": 0.0,
                    "Labels": dict(m.labels),
                }
            )
    return {
        "Timestamp": now.strftime("%Y-%m-%d %H:%M:%S +0000 UTC"),
        "Gauges": gauges,
        "Points": [],
        "Counters": counters,
        "Samples": [],
    }


def prometheus_text(metrics: list[Metric]) -> str:
    """Prometheus' text exposition format (0.0.4); counters end in `_total`."""
    lines: list[str] = []
    for m in metrics:
        name = m.name.replace(".", "_").replace("-", "_")
        if m.kind == "counter":
            name += "_total"
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(m.labels.items()))
        value = int(m.value) if float(m.value).is_integer() and math.isfinite(m.value) else m.value
        lines.append(f"# HELP {name} {m.help}")
        lines.append(f"# TYPE {name} {m.kind}")
        lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def ping_database() -> None:
    """Raise unless the database answers a trivial query (runs on the DB pool)."""
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()


@dataclass(frozen=True)
class Health:
    """Whether this server can serve reads and take writes, and why not."""

    writer_alive: bool
    database_error: str | None
    queue_depth: int
    restarts: int

    @property
    def ok(self) -> bool:
        return self.writer_alive and self.database_error is None

    def as_json(self) -> dict[str, Any]:
        return {
            "Status": "passing" if self.ok else "critical",
            "Writer": {
                "Alive": self.writer_alive,
                "QueueDepth": self.queue_depth,
                "Restarts": self.restarts,
            },
            "Database": {
                "Reachable": self.database_error is None,
                "Error": self.database_error or "",
            },
        }


def health(database_error: str | None) -> Health:
    """This server's health, given the outcome of `ping_database` (None when it answered)."""
    return Health(
        writer_alive=db.writer.alive,
        database_error=database_error,
        queue_depth=db.writer.queue_depth(),
        restarts=db.writer.stats.restarts,
    )
