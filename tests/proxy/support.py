"""Test helpers for the sidecar: a tiny CA, the agent's end of the sidecar
socket, real `mesh-sidecar` processes, and small loopback apps.

The CA is test-only (made with `cryptography`, which tests may import and the
sidecar may not); it issues leaves with SPIFFE URI SANs like the real one.
`AgentSocket` speaks the agent's side of the socket protocol — it is a test
harness of the agent, not a stand-in for the sidecar under test.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshproto.proxycfg import Cluster, Endpoint, Inbound, ProxyConfig, Upstream
from tests.support.servers import free_port  # noqa: F401 - the one port picker for tests

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.mesh"
DC = "dc1"
SIDECAR = str(Path(sys.executable).with_name("mesh-sidecar"))


def spiffe(service: str, trust_domain: str = TRUST_DOMAIN, dc: str = DC) -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/{dc}/svc/{service}"


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- a tiny CA


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class TestCA:
    """A root CA (ECDSA P-256) that signs leaves with a SPIFFE URI SAN."""

    __test__ = False

    def __init__(self, name: str = "Test Mesh CA", trust_domain: str = TRUST_DOMAIN) -> None:
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.root_pem = _pem(self.cert)

    def leaf(
        self,
        service: str | None = None,
        *,
        uris: tuple[str, ...] | None = None,
        hours: float = 24.0,
    ) -> tuple[str, str]:
        """(cert PEM, key PEM) for `service`'s SPIFFE ID, or for the given URIs."""
        if uris is None:
            uris = (spiffe(service, self.trust_domain),) if service else ()
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service or "leaf")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=hours))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem(cert), _key_pem(key)

    def write_leaf(
        self, directory: Path, name: str, service: str | None, **kw: Any
    ) -> tuple[str, str]:
        """A leaf as files (cert, key paths), for clients such as `ssl` or openssl."""
        cert, key = self.leaf(service, **kw)
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_text(cert)
        key_path.write_text(key)
        return str(cert_path), str(key_path)


# --------------------------------------------------------------------------- configs


def proxy_config(
    service: str,
    *,
    version: int,
    inbound_port: int,
    app_port: int,
    upstreams: tuple[Upstream, ...] = (),
    intentions: tuple[dict, ...] = (),
    default_allow: bool = False,
    roots: tuple[str, ...] = (),
) -> dict:
    """A sidecar's ProxyConfig JSON as the control plane would compile it."""
    return ProxyConfig(
        version=version,
        proxy_id=f"{service}-sidecar-proxy",
        service=service,
        service_id=service,
        node="node-a",
        datacenter=DC,
        trust_domain=TRUST_DOMAIN,
        spiffe_id=spiffe(service),
        inbound=Inbound("127.0.0.1", inbound_port, "127.0.0.1", app_port),
        upstreams=upstreams,
        intentions=intentions,
        default_allow=default_allow,
        roots=roots,
    ).to_json()


def upstream(
    destination: str,
    bind_port: int,
    endpoints: list[int],
    *,
    spiffe_id: str | None = None,
    lb_policy: str = "round_robin",
    extra_clusters: tuple[Cluster, ...] = (),
    failover: tuple[str, ...] = (),
    connect_timeout_s: float = 2.0,
) -> Upstream:
    main = Cluster(
        name=f"{destination}.default.{DC}",
        service=destination,
        datacenter=DC,
        spiffe_id=spiffe_id or spiffe(destination),
        sni=f"{destination}.default.{DC}.internal.{TRUST_DOMAIN}",
        endpoints=tuple(Endpoint("127.0.0.1", p) for p in endpoints),
        lb_policy=lb_policy,
        failover=failover,
        connect_timeout_s=connect_timeout_s,
    )
    return Upstream(destination, "127.0.0.1", bind_port, "tcp", clusters=(main, *extra_clusters))


def allow(source: str, destination: str = "*", action: str = "allow") -> dict:
    return {"SourceName": source, "DestinationName": destination, "Action": action}


# --------------------------------------------------------------------------- the agent's side


class AgentSocket:
    """The agent's end of one sidecar's Unix socket: accepts the sidecar, reads
    its hello, pushes messages and returns the sidecar's replies. On a
    (re)connection it replays `replay` (what a real agent would resend)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.hellos: list[dict] = []
        self.replay: dict | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._reader: Any = None
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AgentSocket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(4)
        listener.settimeout(0.2)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._listener is not listener:  # stopped meanwhile: refuse
                conn.close()
                return
            conn.settimeout(10)
            reader = conn.makefile("rb")
            try:
                hello = json.loads(reader.readline())
            except (OSError, ValueError):
                conn.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    conn.close()
                    return
                if self._conn is not None:
                    with contextlib.suppress(OSError):
                        self._conn.shutdown(socket.SHUT_RDWR)
                    self._conn.close()
                    self._reader.close()
                self._conn, self._reader = conn, reader
                self.hellos.append(hello)
                replay = self.replay
            if replay is not None:
                try:
                    self._send_locked(conn, reader, replay)
                except OSError:
                    continue
            self._connected.set()

    @staticmethod
    def _send_locked(conn: socket.socket, reader: Any, msg: dict | bytes) -> dict:
        raw = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\n"
        conn.sendall(raw)
        line = reader.readline()
        if not line:
            raise ConnectionError("sidecar closed the socket")
        return json.loads(line)

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self._connected.wait(timeout):
            raise AssertionError("the sidecar never connected to the agent socket")

    def push(self, msg: dict | bytes, timeout: float = 10.0) -> dict:
        """Send one message (or raw bytes) and return the sidecar's reply."""
        self.wait_connected(timeout)
        with self._lock:
            assert self._conn is not None
            self._conn.settimeout(timeout)
            reply = self._send_locked(self._conn, self._reader, msg)
        if isinstance(msg, dict) and "ack" in reply:
            self.replay = {**(self.replay or {}), **msg}
        return reply

    def stop(self) -> None:
        """The agent goes away: the listening socket and the connection close."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
            listener.close()
        with self._lock:
            if self._conn is not None:
                # shutdown first: the makefile() reader keeps the fd open past close().
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)
                self._conn.close()
                self._reader.close()
            self._conn = None
            self._connected.clear()
        if self._thread is not None:
            self._thread.join(2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --------------------------------------------------------------------------- sidecar processes


class FedProcess:
    """A real data-plane process (`mesh-sidecar`, `mesh-gateway`) fed over an
    `AgentSocket`, as the agent feeds it, with its /metrics on a loopback port
    and its log in `tmp/<name>.log`."""

    def __init__(self, binary: str, tmp: Path, name: str, *extra: str) -> None:
        self.agent = AgentSocket(tmp / f"{name}.sock").start()
        self.metrics_port = free_port()
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                "--proxy-id",
                name,
                "--socket",
                self.agent.path,
                "--metrics-addr",
                f"127.0.0.1:{self.metrics_port}",
                "--log-level",
                "debug",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def metrics(self) -> dict[str, float]:
        """The process's /metrics as {'name{labels}': value}."""
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.agent.stop()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def closing(*procs: FedProcess) -> Iterator[tuple[FedProcess, ...]]:
    """Stop every process on the way out, whatever happened."""
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


class SidecarProcess(FedProcess):
    """A real `mesh-sidecar` process fed by an `AgentSocket`."""

    def __init__(self, tmp: Path, proxy_id: str, *extra: str) -> None:
        self.proxy_id = proxy_id
        super().__init__(SIDECAR, tmp, proxy_id, *extra)

    def push(self, msg: dict | bytes, timeout: float = 10.0) -> dict:
        return self.agent.push(msg, timeout)

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


# --------------------------------------------------------------------------- apps and clients


class App:
    """A threaded loopback TCP app. Modes:
    - "echo": echoes what it reads, as it reads it;
    - "digest": reads to EOF (the caller's half-close), then answers the byte
      count and SHA-256 of everything read, and closes;
    - "http": a keep-alive HTTP/1.1 server answering `name` to every request;
    - "name": writes its name and closes (which instance answered)."""

    def __init__(self, mode: str = "echo", name: str = "app") -> None:
        self.mode = mode
        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = 0  # bytes read from callers, all connections
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn:
                getattr(self, f"_{self.mode}")(conn)
        except OSError:
            pass

    def _echo(self, conn: socket.socket) -> None:
        while data := conn.recv(65536):
            self.received += len(data)
            conn.sendall(data)

    def _digest(self, conn: socket.socket) -> None:
        h, n = hashlib.sha256(), 0
        while data := conn.recv(65536):
            self.received += len(data)
            h.update(data)
            n += len(data)
        conn.sendall(f"{n} {h.hexdigest()}".encode())

    def _name(self, conn: socket.socket) -> None:
        conn.sendall(self.name.encode())

    def _http(self, conn: socket.socket) -> None:
        body = self.name.encode()
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            _, _, buf = buf.partition(b"\r\n\r\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def roundtrip(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    """Connect, send, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def refused(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bool:
    """True when a connection through `port` delivers nothing back (closed or reset)."""
    try:
        return roundtrip(port, payload, timeout) == b""
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return True
    except OSError as exc:  # ENOTCONN: closed before our half-close
        return exc.errno == errno.ENOTCONN


@contextlib.contextmanager
def sidecars(tmp: Path, *names: str) -> Iterator[list[SidecarProcess]]:
    procs = [SidecarProcess(tmp, f"{n}-sidecar-proxy") for n in names]
    with closing(*procs):
        yield procs
