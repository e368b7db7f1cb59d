"""The agent's Prometheus metrics (text exposition format 0.0.4).

Small on purpose: counters and gauges with labels, rendered on demand. The
agent serves them at `-metrics-addr` under `/metrics`.
"""

from __future__ import annotations

from collections import defaultdict


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Named families of samples; `set`/`inc` by label tuple; `render()` for a scrape."""

    def __init__(self) -> None:
        self.help: dict[str, tuple[str, str]] = {}
        self.samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

    def define(self, name: str, kind: str, text: str) -> None:
        self.help[name] = (kind, text)

    def set(self, name: str, value: float, **labels: str) -> None:
        self.samples[name][tuple(sorted(labels.items()))] = float(value)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.samples[name][key] = self.samples[name].get(key, 0.0) + amount

    def remove(self, name: str, **labels: str) -> None:
        self.samples[name].pop(tuple(sorted(labels.items())), None)

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())))

    def render(self) -> bytes:
        lines: list[str] = []
        for name, (kind, text) in sorted(self.help.items()):
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(self.samples.get(name, {}).items()):
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                shown = repr(value) if value != int(value) else str(int(value))
                lines.append(f"{name}{{{label_text}}} {shown}" if label_text else f"{name} {shown}")
        return ("\n".join(lines) + "\n").encode()


def agent_metrics() -> Metrics:
    m = Metrics()
    m.define(
        "mesh_agent_connected",
        "gauge",
        "1 while the agent has a working connection to the control plane.",
    )
    m.define(
        "mesh_agent_reconnects_total", "counter", "Connections to the control plane that were lost."
    )
    m.define("mesh_agent_syncs_total", "counter", "Full syncs (SyncNode) by result.")
    m.define("mesh_agent_check_updates_total", "counter", "Partial syncs (UpdateChecks) by result.")
    m.define(
        "mesh_agent_last_sync_timestamp_seconds", "gauge", "When the last full sync succeeded."
    )
    m.define(
        "mesh_agent_services", "gauge", "Services registered on this host (sidecars included)."
    )
    m.define("mesh_agent_check_status", "gauge", "1 for each check's current status.")
    m.define(
        "mesh_agent_check_runs_total", "counter", "Check results recorded, by check and status."
    )
    m.define(
        "mesh_agent_proxy_config_version", "gauge", "The config version each sidecar acked last."
    )
    m.define(
        "mesh_agent_proxy_config_received_version",
        "gauge",
        "The config version last received per proxy.",
    )
    m.define(
        "mesh_agent_proxy_config_nacks_total", "counter", "Config versions rejected, per proxy."
    )
    m.define(
        "mesh_agent_proxy_cert_expiry_seconds",
        "gauge",
        "Seconds until each proxy's leaf certificate expires.",
    )
    m.define("mesh_agent_leaf_renewals_total", "counter", "Leaf certificates signed, per proxy.")
    m.define(
        "mesh_agent_sidecar_restarts_total",
        "counter",
        "Sidecar processes restarted after they exited.",
    )
    m.define(
        "mesh_agent_sidecar_connected", "gauge", "1 while a sidecar is connected to its socket."
    )
    m.define(
        "mesh_agent_node_cert_expiry_seconds",
        "gauge",
        "Seconds until the node certificate expires.",
    )
    return m


def with_label(text: str, name: str, value: str) -> tuple[list[str], list[str]]:
    """Split a scrape into its HELP/TYPE lines and its samples, each sample with
    one more label (`proxy_id="web-sidecar-proxy"`)."""
    meta, samples = [], []
    label = f'{name}="{_escape(value)}"'
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            meta.append(line)
            continue
        metric, _, rest = line.partition(" ")
        if "{" in metric:
            head, _, labels = metric.partition("{")
            metric = f"{head}{{{label},{labels}" if labels != "}" else f"{head}{{{label}}}"
        else:
            metric = f"{metric}{{{label}}}"
        samples.append(f"{metric} {rest}")
    return meta, samples


def merge_scrapes(own: bytes, sidecars: dict[str, str]) -> bytes:
    """The agent's metrics followed by every local sidecar's, labelled by proxy.

    One scrape per host then shows the data plane too (connections, bytes,
    handshake failures, authorisation denials per sidecar).
    """
    seen_meta: set[str] = set()
    meta_lines: list[str] = []
    sample_lines: list[str] = []
    for proxy_id, text in sorted(sidecars.items()):
        meta, samples = with_label(text, "proxy_id", proxy_id)
        for line in meta:
            if line not in seen_meta:
                seen_meta.add(line)
                meta_lines.append(line)
        sample_lines.extend(samples)
    if not sample_lines:
        return own
    return own + ("\n".join(meta_lines + sample_lines) + "\n").encode()
