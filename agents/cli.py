"""`mesh agent`: flags -> AgentConfig -> Agent. Django-free (never imports registry)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Run the per-host agent: join the control plane with a join token (first start),
register this host's services from the config dir, run their health checks,
keep the catalog in sync, serve the local /v1/agent API and run one sidecar
per connect-proxy.

  mesh join-token create            # on the control plane: prints TOKEN and PIN
  mesh agent -data-dir /var/lib/mesh-agent -config-dir /etc/mesh.d \\
      -join 10.0.0.5:8502 -join-token TOKEN -ca-pin sha256:PIN
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The agent's flags (single-dash, as Consul's; double-dash works too)."""
    p.add_argument(
        "-data-dir",
        "--data-dir",
        dest="data_dir",
        help="state directory (identity, registrations, sockets)",
    )
    p.add_argument(
        "-config-dir",
        "--config-dir",
        dest="config_dirs",
        action="append",
        help="directory of service definitions (.json, .yaml, .hcl); repeatable",
    )
    p.add_argument(
        "-join",
        "--join",
        dest="join",
        help="control plane gRPC address HOST:PORT (default port 8502)",
    )
    p.add_argument(
        "-join-token",
        "--join-token",
        dest="join_token",
        help="join token from `mesh join-token create`",
    )
    p.add_argument(
        "-ca-pin",
        "--ca-pin",
        dest="ca_pin",
        help="sha256:HEX of the CA root, as join-token create prints it",
    )
    p.add_argument("-node", "--node", dest="node", help="node name (default: the host name)")
    p.add_argument(
        "-bind", "--bind", dest="bind", help="address other hosts reach this host's sidecars on"
    )
    p.add_argument(
        "-http-addr",
        "--http-addr",
        dest="http_addr",
        help="local agent API (default 127.0.0.1:8500)",
    )
    p.add_argument(
        "-metrics-addr", "--metrics-addr", dest="metrics_addr", help="Prometheus metrics HOST:PORT"
    )
    p.add_argument(
        "-node-meta",
        "--node-meta",
        dest="node_meta",
        action="append",
        metavar="KEY:VALUE",
        help="node metadata (repeatable)",
    )
    p.add_argument(
        "-dc", "--dc", "-datacenter", dest="dc", help="datacenter (default: learnt from the server)"
    )
    p.add_argument(
        "-sync-interval",
        "--sync-interval",
        dest="sync_interval",
        help="anti-entropy full sync interval (default 30s)",
    )
    p.add_argument(
        "-rtt-interval",
        "--rtt-interval",
        dest="rtt_interval",
        help="how often round trips are measured for network coordinates (default 10s)",
    )
    p.add_argument(
        "-rpc-timeout",
        "--rpc-timeout",
        dest="rpc_timeout",
        help="deadline of each RPC (default 10s)",
    )
    p.add_argument(
        "-sidecar-bin",
        "--sidecar-bin",
        dest="sidecar_bin",
        help="sidecar executable (default mesh-sidecar)",
    )
    p.add_argument(
        "-replace",
        "--replace",
        dest="replace",
        action="store_true",
        help="join even when a live node holds the -node name (that node is cut off)",
    )
    p.add_argument(
        "-traffic-report-interval",
        "--traffic-report-interval",
        dest="traffic_report_interval",
        help="how often the sidecars' request counts are reported for golden metrics "
        "(default 10s; 0s: never)",
    )
    p.add_argument(
        "-otlp-endpoint",
        "--otlp-endpoint",
        dest="otlp_endpoint",
        help="OTLP/HTTP collector URL the sidecars export spans to "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT in the sidecars' environment)",
    )
    p.add_argument(
        "-trace-sample-ratio",
        "--trace-sample-ratio",
        dest="trace_sample_ratio",
        help="share of new traces the sidecars sample, 0..1 (default 0.01, as Istio)",
    )
    p.add_argument(
        "-access-log-dir",
        "--access-log-dir",
        dest="access_log_dir",
        help="directory of the sidecars' JSON access logs, <proxy-id>.log "
        "(default <data-dir>/access-logs; none: no access logs)",
    )
    p.add_argument(
        "-log-level",
        "--log-level",
        dest="log_level",
        default="info",
        help="debug, info, warning, error",
    )


def run(args: argparse.Namespace) -> int:
    """Validate the flags and run the agent until SIGTERM/SIGINT; returns the exit code."""
    from agents import config as agent_config

    try:
        cfg = agent_config.build(
            data_dir=args.data_dir,
            config_dirs=args.config_dirs,
            join=args.join,
            join_token=args.join_token,
            ca_pin=args.ca_pin,
            node=args.node,
            bind=args.bind,
            http_addr=args.http_addr,
            metrics_addr=args.metrics_addr,
            dc=args.dc,
            sync_interval=args.sync_interval,
            rtt_interval=args.rtt_interval,
            rpc_timeout=args.rpc_timeout,
            sidecar_bin=args.sidecar_bin,
            log_level=args.log_level,
            node_meta=args.node_meta,
            replace=args.replace,
            traffic_report_interval=args.traffic_report_interval,
            otlp_endpoint=args.otlp_endpoint,
            trace_sample_ratio=args.trace_sample_ratio,
            access_log_dir=args.access_log_dir,
        )
    except agent_config.ConfigError as exc:
        print(f"mesh agent: {exc}", file=sys.stderr)
        return 2
    from agents.agent import main_async

    return main_async(cfg)


def register(sub) -> None:
    """Add `agent` to the `mesh` subcommands."""
    p = sub.add_parser(
        "agent",
        help="run the per-host agent (join, services, checks, sidecars, local API)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mesh agent",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
