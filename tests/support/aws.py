"""AWS for tests and benchmarks: moto's server on loopback, seeded through boto3.

`MotoServer` runs `moto_server -H 127.0.0.1 -p <port>` as a real process; every
client here talks to it over HTTP exactly as meshweb's provider does. Cloud
Map's discovery calls (`DiscoverInstances`) need `inject_host_prefix=False`
against a local endpoint. `ThrottlingProxy` sits in front of moto and answers
chosen API operations with AWS's `ThrottlingException` a given number of
times: the fault a busy AWS account shows, injected on the wire.
"""

from __future__ import annotations

import http.client
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
from botocore.config import Config

from tests.support.servers import die_with_parent, free_port, listens_on

REGION = "us-east-1"
KEY_ID = "AKIAMESHTESTKEY00001"
SECRET = "mesh-test-secret-access-key/not-real"


@dataclass
class MotoServer:
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> MotoServer:
        """Start moto on `port`, or on a free port (another one if a parallel run takes it first)."""
        chosen = self.port
        self.log_path = log_dir / "moto.log"
        for _ in range(3):
            self.port = chosen or free_port()
            if self._start_on_port():
                return self
            if chosen:
                break
        raise RuntimeError(f"port {self.port} is taken by another process")

    def _start_on_port(self) -> bool:
        """True once our moto answers; False when another process holds the port."""
        exe = Path(sys.executable).with_name("moto_server")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process owns it
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log_path.read_text()[-2000:]
                if "Address already in use" in text:
                    return False
                raise RuntimeError(f"moto_server exited: {text}")
            try:
                if httpx.get(self.url + "/moto-api/", timeout=1).status_code < 500:
                    if listens_on(self.proc.pid, self.port):
                        return True
                    self.stop()  # another process answered on our port
                    return False
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def reset(self) -> None:
        httpx.post(self.url + "/moto-api/reset", timeout=30).raise_for_status()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def client(self, service: str, region: str = REGION):
        return boto3.client(
            service,
            region_name=region,
            endpoint_url=self.url,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            config=Config(inject_host_prefix=False, retries={"max_attempts": 1}),
        )


@dataclass
class CloudMapSeed:
    namespace_id: str
    services: dict[str, str]  # name -> service id
    instances: dict[str, list[str]] = field(default_factory=dict)  # name -> instance ids


def seed_cloud_map(
    moto: MotoServer,
    namespace: str,
    counts: dict[str, int],
    *,
    health: bool = True,
    attributes=None,
) -> CloudMapSeed:
    """A namespace with services of `counts[name]` instances each: address 10.x.y.z,
    port 8000+n, a custom attribute `version`. Services have custom health checks
    when `health`."""
    sd = moto.client("servicediscovery")
    op = sd.create_http_namespace(Name=namespace)
    ns_id = sd.get_operation(OperationId=op["OperationId"])["Operation"]["Targets"]["NAMESPACE"]
    seed = CloudMapSeed(ns_id, {})
    for s_index, (name, count) in enumerate(counts.items()):
        kw = {"HealthCheckCustomConfig": {"FailureThreshold": 1}} if health else {}
        svc = sd.create_service(Name=name, NamespaceId=ns_id, **kw)["Service"]
        seed.services[name] = svc["Id"]
        seed.instances[name] = []
        for i in range(count):
            iid = f"{name}-{i}"
            attrs = {
                "AWS_INSTANCE_IPV4": f"10.{s_index}.{i // 250}.{i % 250 + 1}",
                "AWS_INSTANCE_PORT": str(8000 + i % 1000),
                "version": f"v{i % 3}",
            }
            if attributes:
                attrs.update(attributes(name, i))
            sd.register_instance(ServiceId=svc["Id"], InstanceId=iid, Attributes=attrs)
            seed.instances[name].append(iid)
    return seed


def seed_ec2(moto: MotoServer, services: dict[str, int], port: int | None = 9000) -> list[str]:
    """Running EC2 instances tagged `mesh:service` (and `mesh:port`); returns their IDs."""
    ec2 = moto.client("ec2")
    ids = []
    for name, count in services.items():
        tags = [{"Key": "mesh:service", "Value": name}]
        if port is not None:
            tags.append({"Key": "mesh:port", "Value": str(port)})
        found = ec2.run_instances(
            ImageId="ami-12345678",
            MinCount=count,
            MaxCount=count,
            InstanceType="t3.micro",
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        ids += [i["InstanceId"] for i in found["Instances"]]
    return ids


# --- throttling on the wire ---------------------------------------------------------------


class ThrottlingProxy:
    """An HTTP proxy to moto that answers `ThrottlingException` (400) to the next
    `n` requests of an operation (`X-Amz-Target` ending `.<Operation>` or an
    EC2 `Action=<Operation>` body), and counts what it refused."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.pending: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = self.headers.get("X-Amz-Target", "").rsplit(".", 1)[-1]
                if not target and b"Action=" in body:
                    target = body.split(b"Action=", 1)[1].split(b"&", 1)[0].decode()
                with proxy.lock:
                    throttle = proxy.pending.get(target, 0) > 0
                    if throttle:
                        proxy.pending[target] -= 1
                        proxy.refused[target] = proxy.refused.get(target, 0) + 1
                if throttle:
                    data = (
                        b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
                        if self.headers.get("X-Amz-Target")
                        else b"<Response><Errors><Error><Code>Throttling</Code><Message>Rate exceeded"
                        b"</Message></Error></Errors></Response>"
                    )
                    self.send_response(400)
                    self.send_header("Content-Type", "application/x-amz-json-1.1")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThrottlingProxy:
        self.thread.start()
        return self

    def throttle(self, operation: str, times: int) -> None:
        with self.lock:
            self.pending[operation] = times

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
