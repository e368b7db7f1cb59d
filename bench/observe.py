"""What observing one request costs the sidecar: `Observer.begin` +
`upstream_headers()` + `finish`, per request, for each observability setting.

    .venv/bin/python bench/observe.py [--requests 200000]

Prints one line per setting (microseconds per request, median of 5 runs, and
requests per CPU-second). Spans go to a loopback OTLP/HTTP receiver started
here (the export itself runs on the SDK's own thread, so its cost shows as
CPU time, not in the per-request figure); the access log goes to a temporary
file. Run on a quiet machine: other load moves every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.proxy.observe import RequestRecord  # noqa: E402
from agents.proxy.observe.observer import MeshObserver, ObserveOptions  # noqa: E402

HEADERS = [
    (b"host", b"api"),
    (b"user-agent", b"bench"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]


def _receiver() -> tuple[ThreadingHTTPServer, str]:
    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _run(obs: MeshObserver, records: list[RequestRecord]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for r in records:
        span = obs.begin(r.reporter, HEADERS)
        span.upstream_headers()
        span.finish(r)
    return time.perf_counter() - wall, time.process_time() - cpu


async def main(n: int) -> None:
    records = [
        RequestRecord(
            "destination",
            "web",
            "api",
            "GET",
            "/items",
            "api",
            "http",
            200 if i % 20 else 503,
            time.time(),
            0.001 + (i % 50) / 1000,
            120,
            2048,
            request_id=f"{i:08d}-0000-4000-8000-000000000000",
        )  # fmt: skip
        for i in range(n)
    ]
    server, url = _receiver()
    tmp = Path(tempfile.mkdtemp())
    settings = {
        "metrics only (traces propagated, none sampled)": ObserveOptions(sample_ratio=0.0),
        "metrics + access log": ObserveOptions(sample_ratio=0.0, access_log=str(tmp / "a.log")),
        "metrics + access log + every span exported": ObserveOptions(
            access_log=str(tmp / "b.log"), otlp_endpoint=url, sample_ratio=1.0
        ),
    }
    print(f"{n} requests per run, median of 5 runs")
    for label, options in settings.items():
        runs = []
        for _ in range(5):
            obs = MeshObserver(options)
            # The headers carry a sampled parent: "none sampled" means a 0 ratio
            # and no parent, so drop it for those settings.
            if options.sample_ratio == 0.0:
                HEADERS[2] = (b"x-no-trace", b"")
            else:
                HEADERS[2] = (
                    b"traceparent",
                    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
            runs.append(_run(obs, records))
            obs.close()
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"  {label:48s} {wall / n * 1e6:7.2f} us/request   {n / cpu:10.0f} requests/CPU-s")
    server.shutdown()
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=200_000)
    args = p.parse_args()
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "1000000")  # measure, do not drop
    asyncio.run(main(args.requests))
