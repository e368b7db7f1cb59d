"""Key material → TLS contexts, and reading a peer's SPIFFE ID (no `cryptography`).

`ssl.SSLContext.load_cert_chain` only reads files, so the leaf and its key are
written to a private directory (0700, files 0600), loaded, and unlinked at
once: the key lives on disk for the few microseconds of the load. Every change
of leaf or roots builds a fresh pair of contexts; connections keep the context
they started with, so a swap only affects new handshakes.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from dataclasses import dataclass

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only. TLS 1.3 suites are all
# (EC)DHE + AEAD already and are not affected by set_ciphers.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class MaterialError(ValueError):
    """Certificates, key or roots that cannot make a working TLS context."""


@dataclass(frozen=True)
class Material:
    """The leaf (PEM, possibly with intermediates), its key and the trust roots."""

    cert: str
    key: str
    roots: tuple[str, ...]


@dataclass(frozen=True)
class Contexts:
    """What a handshake needs: built together from one `Material`."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    # The HTTP listeners' client side: offers ALPN `http/1.1` (the server offers
    # `h2` and `http/1.1`; L4 clients offer nothing and get nothing).
    client_h1: ssl.SSLContext
    client_h2: ssl.SSLContext  # offers ALPN `h2` (http2 and grpc upstreams)
    leaf_uri: str | None  # the leaf's own SPIFFE ID, when it could be read
    not_after: float | None  # unix seconds


class KeyDir:
    """A private directory for the moments a key must be a file."""

    def __init__(self, base: str | None = None) -> None:
        base = base or os.environ.get("TMPDIR") or "/tmp"
        self.path = os.path.join(base, f"mesh-sidecar-{os.getpid()}-{os.urandom(6).hex()}")
        os.mkdir(self.path, 0o700)
        os.chmod(self.path, 0o700)  # whatever the umask
        self._n = 0

    def write(self, name: str, data: str) -> str:
        self._n += 1
        path = os.path.join(self.path, f"{self._n}-{name}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        return path

    def remove(self) -> None:
        try:
            for name in os.listdir(self.path):
                os.unlink(os.path.join(self.path, name))
            os.rmdir(self.path)
        except OSError:
            pass


def _base(ctx: ssl.SSLContext, roots: tuple[str, ...]) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No session resumption between sidecars: tickets would only cost bytes and CPU.
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.load_verify_locations(cadata="\n".join(roots))


def build_contexts(material: Material, keydir: KeyDir) -> Contexts:
    """Server and client contexts for `material`; MaterialError if anything is off.

    Both sides require and verify the peer's chain against the roots (mTLS);
    host names are not checked — the caller compares SPIFFE IDs instead.
    """
    if not material.roots:
        raise MaterialError("no trust roots")
    if "-----BEGIN" not in material.cert or "-----BEGIN" not in material.key:
        raise MaterialError("cert and key must be PEM")
    cert_path = keydir.write("cert.pem", material.cert)
    key_path = keydir.write("key.pem", material.key)
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_h1 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_h2 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for ctx in (server, client, client_h1, client_h2):
            _base(ctx, material.roots)
            ctx.load_cert_chain(cert_path, key_path)
        client.check_hostname = client_h1.check_hostname = client_h2.check_hostname = False
        server.set_alpn_protocols(["h2", "http/1.1"])
        client_h1.set_alpn_protocols(["http/1.1"])
        client_h2.set_alpn_protocols(["h2"])
        server.num_tickets = 0
        leaf_uri, not_after = _leaf_facts(cert_path)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise MaterialError(f"cannot build TLS contexts: {exc}") from None
    finally:
        for path in (cert_path, key_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
    return Contexts(server, client, client_h1, client_h2, leaf_uri, not_after)


def _leaf_facts(cert_path: str) -> tuple[str | None, float | None]:
    """The leaf's SPIFFE URI and notAfter, read by the ssl module's own decoder.

    `_test_decode_cert` is private but has been in CPython for 15 years; if it
    ever goes, the agent's `cert_not_after` still feeds the expiry metric.
    """
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # noqa: SLF001
    if decode is None:
        return None, None
    try:
        info = decode(cert_path)
    except (ssl.SSLError, OSError, ValueError):
        return None, None
    uris = spiffe_uris(info)
    not_after = info.get("notAfter")
    return (
        uris[0] if len(uris) == 1 else None,
        ssl.cert_time_to_seconds(not_after) if not_after else None,
    )


def spiffe_uris(cert: dict | None) -> list[str]:
    """The URI SANs of a certificate as `getpeercert()` returns it."""
    if not cert:
        return []
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def peer_spiffe_id(cert: dict | None) -> str | None:
    """The peer's SPIFFE ID: its one `spiffe://` URI SAN, else None.

    SPIFFE's X.509 profile allows exactly one URI SAN; a certificate with
    several is refused rather than guessed at.
    """
    uris = spiffe_uris(cert)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return None
    return uris[0]


class TrustDomains:
    """Which roots may vouch for which trust domain, once peers are trusted.

    A sidecar that calls (or is exported to) a peered cluster loads that
    cluster's roots into its TLS contexts beside its own, so OpenSSL accepts
    a chain ending at either. That alone would let a peer's CA vouch for a
    SPIFFE ID of *our* trust domain (or another peer's); so each handshake's
    leaf must also be issued directly by a root of the trust domain its
    SPIFFE ID names. Without peers this is never consulted (the roots are
    ours alone). `cryptography` is imported on first use: sidecars without
    peers never load it.
    """

    MAX_CACHED = 4096

    def __init__(self, domains: dict[str, tuple[str, ...]]) -> None:
        self.domains = domains
        self._roots: dict[str, list] | None = None
        self._cache: dict[bytes, str | None] = {}

    def check(self, uri: str | None, leaf_der: bytes | None) -> str | None:
        """None when the leaf may carry `uri`; else why not (a refusal reason)."""
        if uri is None or leaf_der is None:
            return "no_spiffe_id"
        domain = uri[len("spiffe://") :].split("/", 1)[0] if uri.startswith("spiffe://") else ""
        if domain not in self.domains:
            return "foreign_trust_domain"
        key = domain.encode() + b"\0" + leaf_der
        if key in self._cache:
            return self._cache[key]
        verdict = None if self._issued_by(domain, leaf_der) else "wrong_issuer_for_trust_domain"
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[key] = verdict
        return verdict

    def _issued_by(self, domain: str, leaf_der: bytes) -> bool:
        from cryptography import x509  # lazily: only sidecars with peers get here

        if self._roots is None:
            self._roots = {
                d: [
                    x509.load_pem_x509_certificate(block.encode())
                    for pem in pems
                    for block in _pem_blocks(pem)
                ]
                for d, pems in self.domains.items()
            }
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
        except ValueError:
            return False
        for root in self._roots.get(domain, ()):
            try:
                leaf.verify_directly_issued_by(root)
                return True
            except (ValueError, TypeError, Exception):  # InvalidSignature, wrong issuer
                continue
        return False


def _pem_blocks(pem: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [part + end for part in pem.split(end) if "-----BEGIN CERTIFICATE-----" in part]
