"""Instructions per request of each sidecar of the HTTP/1.1 pair, counted by
callgrind: a figure that other work on the machine does not move.

A real pair (web's outbound listener → mTLS → api's inbound listener → a
small HTTP app in this process), both `mesh-sidecar` processes run under
`valgrind --tool=callgrind` with instrumentation off until the pair is warm;
then `--requests` sequential keep-alive GETs are counted on both sides
(`callgrind_control -i on`, dump, off). Each request is its own wake-up of
each sidecar, as at a fixed low rate: the count includes the event loop,
TLS, the parser and the Python of the request's way, not the kernel.

    .venv/bin/python bench/http_instructions.py [--requests 300] [--access-log]

Needs Debian's valgrind. Under valgrind a sidecar runs about 50× slower:
about a minute in all.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tests.proxy.support as support  # noqa: E402
from meshproto.proxycfg import Route, RouteMatch, WeightedCluster  # noqa: E402
from tests.proxy.http_support import Client, HttpApp, cluster, config, http_upstream  # noqa: E402


def counted(out_dir: Path, pid: int) -> int:
    """The instructions of the last callgrind dump of `pid`."""
    files = sorted(glob.glob(str(out_dir / f"cg.{pid}.out.*")), key=os.path.getmtime)
    total = 0
    for line in Path(files[-1]).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="requests counted (default 300)")
    p.add_argument("--warmup", type=int, default=50, help="requests before counting (50)")
    p.add_argument("--access-log", action="store_true", help="both sidecars write access logs")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-instr-") as tmp_name:
        tmp = Path(tmp_name)
        wrapper = tmp / "sidecar-under-callgrind"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind -q --tool=callgrind --instr-atstart=no "
            f'--callgrind-out-file={tmp}/cg.%p.out {sys.executable} {support.SIDECAR} "$@"\n'
        )
        wrapper.chmod(0o755)
        support.SIDECAR = str(wrapper)
        ca = support.TestCA()
        app = HttpApp("v1")
        extra = lambda name: ("--access-log", str(tmp / f"{name}.log")) if args.access_log else ()  # noqa: E731
        api = support.SidecarProcess(tmp, "api-sidecar-proxy", *extra("api"))
        web = support.SidecarProcess(tmp, "web-sidecar-proxy", *extra("web"))
        client = None
        try:
            api_port, up = support.free_port(), support.free_port()
            cert, key = ca.leaf("api")
            cfg = config("api", version=1, inbound_port=api_port, app_port=app.port,
                         proxy_id="api-sidecar-proxy", intentions=(support.allow("web"),),
                         inbound={})  # fmt: skip
            api.push({"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]}, 180)
            target = cluster("api", [api_port], subset="v1")
            route = Route(RouteMatch(path_prefix="/"), (WeightedCluster(target.name, 100.0),))
            cert, key = ca.leaf("web")
            cfg = config("web", version=1, inbound_port=support.free_port(), app_port=1,
                         upstreams=(http_upstream("api", up, (target,), (route,)),))  # fmt: skip
            web.push({"config": cfg, "cert": cert, "key": key, "roots": [ca.root_pem]}, 180)
            client = Client(up, timeout=60)
            for _ in range(args.warmup):
                assert client.get("/warm")[0] == 200
            pids = {"client side (web)": web.proc.pid, "server side (api)": api.proc.pid}
            for pid in pids.values():
                subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                               capture_output=True)  # fmt: skip
            headers = {"user-agent": "bench", "accept": "*/*"}
            for _ in range(args.requests):
                assert client.get("/bench/path?x=1", headers=headers)[0] == 200
            for pid in pids.values():
                subprocess.run(["callgrind_control", "-d", str(pid)], check=True,
                               capture_output=True)  # fmt: skip
            total = 0
            for side, pid in pids.items():
                n = counted(tmp, pid)
                total += n
                print(f"{side}: {n / args.requests:>10,.0f} instructions per request")
            print(f"pair: {total / args.requests:>10,.0f} instructions per request "
                  f"({args.requests} requests{', access logs on' if args.access_log else ''})")  # fmt: skip
        finally:
            if client is not None:
                client.close()
            web.stop(60)
            api.stop(60)
            app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
