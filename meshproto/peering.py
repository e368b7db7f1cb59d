"""Cluster peering: the peering token and its checks (pure, no Django, no I/O).

A peering joins two separate control planes. The *acceptor* makes a token
(`POST /v1/peering/token`); an operator carries it to the *dialer*, which
presents it (`POST /v1/peering/establish`). The token is base64 of JSON, as
Consul's, holding:

- `Payload`: the acceptor's peering ID, server addresses, trust domain,
  datacenter, the SHA-256 pin of its CA roots, the expiry (unix seconds) and
  a random establishment secret;
- `Signature`: HMAC-SHA256 of the canonical payload under a key only the
  acceptor holds (derived from its secret key).

The dialer can read the token (where to call, whose roots to expect) but not
forge one: the acceptor checks the signature, the expiry and that the secret
was never used before (a conditional update), so a token that was altered,
expired or already used is refused with a message naming which.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

TOKEN_VERSION = 1
MAX_TOKEN_BYTES = 16 * 1024
MAX_ADDRESSES = 16
PEER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Header a peer presents its stream secret in when it pulls exported services.
SECRET_HEADER = "X-Mesh-Peering-Secret"


class PeeringError(ValueError):
    """A token or a peering request that cannot be used; `str()` says why."""


def check_peer_name(name: Any, what: str = "PeerName") -> str:
    """A peer name as Consul accepts it: a DNS label (lower case, digits, '-')."""
    if not isinstance(name, str) or not name:
        raise PeeringError(f"{what} is required")
    if not PEER_NAME.match(name):
        raise PeeringError(
            f"{what} {name!r} is not valid: use at most 63 lower-case letters, digits "
            "and '-', starting and ending with a letter or digit"
        )
    return name


def roots_pin(pems: Iterable[str]) -> str:
    """The pin of a set of CA roots: SHA-256 over the sorted, stripped PEMs."""
    material = "\n".join(sorted(p.strip() for p in pems)).encode()
    return "sha256:" + hashlib.sha256(material).hexdigest()


def signing_key(secret_key: str) -> bytes:
    """The HMAC key for tokens, derived from the server's secret key."""
    return hashlib.sha256(b"meshweb peering token v1\0" + secret_key.encode()).digest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenPayload:
    """What a token carries (field names as in its JSON)."""

    PeerID: str
    PeerName: str  # the name the acceptor gave the dialer
    ServerAddresses: tuple[str, ...]
    TrustDomain: str
    Datacenter: str
    CAPin: str
    ExpiresAt: int
    EstablishmentSecret: str
    Version: int = TOKEN_VERSION

    def canonical(self) -> bytes:
        data = asdict(self)
        data["ServerAddresses"] = list(self.ServerAddresses)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def sign(payload: TokenPayload, key: bytes) -> str:
    return base64.b64encode(hmac.new(key, payload.canonical(), hashlib.sha256).digest()).decode()


def encode_token(payload: TokenPayload, key: bytes) -> str:
    """The token text handed to the operator."""
    body = {
        "Payload": json.loads(payload.canonical()),
        "Signature": sign(payload, key),
    }
    return base64.b64encode(json.dumps(body, sort_keys=True).encode()).decode()


def _str(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise PeeringError(f"peering token is malformed: {key} is missing")
    return value


def decode_token(text: Any) -> tuple[TokenPayload, str]:
    """(payload, signature) of a token, PeeringError if it is not one.

    Does not check the signature (only the acceptor can): see `verify`.
    """
    if not isinstance(text, str) or not text.strip():
        raise PeeringError("PeeringToken is required")
    raw = text.strip()
    if len(raw) > MAX_TOKEN_BYTES:
        raise PeeringError(f"peering token is malformed: longer than {MAX_TOKEN_BYTES} bytes")
    try:
        body = json.loads(base64.b64decode(raw, validate=True))
    except (ValueError, TypeError):
        raise PeeringError("peering token is malformed: not base64-encoded JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("Payload"), dict):
        raise PeeringError("peering token is malformed: no payload")
    data = body["Payload"]
    signature = body.get("Signature")
    if not isinstance(signature, str) or not signature:
        raise PeeringError("peering token is malformed: no signature")
    if data.get("Version") != TOKEN_VERSION:
        raise PeeringError(f"peering token version {data.get('Version')!r} is not supported")
    addresses = data.get("ServerAddresses")
    if (
        not isinstance(addresses, list)
        or not addresses
        or len(addresses) > MAX_ADDRESSES
        or not all(isinstance(a, str) and a for a in addresses)
    ):
        raise PeeringError("peering token is malformed: ServerAddresses must list addresses")
    expires = data.get("ExpiresAt")
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise PeeringError("peering token is malformed: ExpiresAt is missing")
    payload = TokenPayload(
        PeerID=_str(data, "PeerID"),
        PeerName=_str(data, "PeerName"),
        ServerAddresses=tuple(addresses),
        TrustDomain=_str(data, "TrustDomain"),
        Datacenter=_str(data, "Datacenter"),
        CAPin=_str(data, "CAPin"),
        ExpiresAt=expires,
        EstablishmentSecret=_str(data, "EstablishmentSecret"),
    )
    return payload, signature


def check_expiry(payload: TokenPayload, now: float) -> None:
    if now >= payload.ExpiresAt:
        raise PeeringError(
            f"peering token expired {int(now - payload.ExpiresAt)}s ago: generate a new one "
            "on the accepting cluster"
        )


def verify(text: Any, key: bytes, now: float) -> TokenPayload:
    """The payload of a token this acceptor signed and that has not expired.

    PeeringError says which check failed: malformed, altered (signature),
    expired. Single use is the acceptor's stored state (its caller's check).
    """
    payload, signature = decode_token(text)
    if not hmac.compare_digest(signature, sign(payload, key)):
        raise PeeringError(
            "peering token signature is invalid: the token was altered or was not issued "
            "by this cluster"
        )
    check_expiry(payload, now)
    return payload


def server_url(address: str) -> str:
    """`host:port` (or a full http(s) URL) as the base URL to call."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    return "http://" + address


def peered_sni(service: str, namespace: str, dc: str, trust_domain: str) -> str:
    """The SNI an importer's sidecar sends for an exported service.

    It is the exporter's own mesh-gateway SNI (its trust domain), so the
    exporter's gateway routes it like any of its services, and the importer's
    gateway routes by the foreign trust domain to the exporter's gateways.
    """
    return f"{service}.{namespace}.{dc}.internal.{trust_domain}"
