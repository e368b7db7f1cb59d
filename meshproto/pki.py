"""Keys, CSRs and certificate inspection, shared by the CA and the agents.

Keys are born where they are used: an agent calls `generate_key` and
`make_csr` and sends only the CSR; the private key never leaves its host.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

KEY_TYPES = {"ec": (256, 384), "rsa": (2048, 4096)}
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key(key_type: str = "ec", bits: int = 256) -> PrivateKey:
    """A new private key: ECDSA P-256/P-384 or RSA 2048/4096."""
    if key_type == "ec":
        curve = {256: ec.SECP256R1(), 384: ec.SECP384R1()}.get(bits)
        if curve is None:
            raise ValueError(f"unsupported EC key size {bits} (use 256 or 384)")
        return ec.generate_private_key(curve)
    if key_type == "rsa":
        if bits not in KEY_TYPES["rsa"]:
            raise ValueError(f"unsupported RSA key size {bits} (use 2048 or 4096)")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise ValueError(f"unsupported key type {key_type!r} (use ec or rsa)")


def key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def load_key(pem: str | bytes) -> PrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    return serialization.load_pem_private_key(data, password=None)  # type: ignore[return-value]


def make_csr(key: PrivateKey, uri: str, dns_names: list[str] | tuple[str, ...] = ()) -> str:
    """A PEM CSR asking for `uri` (a SPIFFE ID) as its only URI SAN."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    sans += [x509.DNSName(d) for d in dns_names]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_cert(pem: str | bytes) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data)


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificates(data) if data.strip() else []


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def dns_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.DNSName)


def spiffe_id_of(cert: x509.Certificate) -> str | None:
    """The one SPIFFE URI SAN of a certificate, or None."""
    uris = [u for u in uri_sans(cert) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def key_id(public_key) -> str:
    """Consul's colon-separated hex SubjectKeyIdentifier of a public key."""
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key).digest
    return ":".join(f"{b:02x}" for b in ski)


@dataclass(frozen=True)
class CertInfo:
    serial: str
    spiffe_id: str | None
    not_before: dt.datetime
    not_after: dt.datetime
    subject_cn: str


def info(cert: x509.Certificate) -> CertInfo:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertInfo(
        serial=":".join(f"{b:02x}" for b in cert.serial_number.to_bytes(20, "big").lstrip(b"\0")),
        spiffe_id=spiffe_id_of(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        subject_cn=cn[0].value if cn else "",
    )
