"""CA providers: who holds root keys and signs with them.

`CAProvider` is the seam (Consul's `ca.Provider`): the CA manager
(`registry.ca.manager`) is the only caller and the only writer of CA state;
a provider never touches the database. The built-in provider keeps its keys
in meshweb's database (encrypted by `registry.ca.secrets`, which is the
manager's business, not the provider's) and signs with `cryptography`.

Providers are looked up by the CA configuration's `Provider` name in
`PROVIDERS` (name -> dotted path), so another one (Vault, a cloud PCA) is a
new class and a new line in the table.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproto import pki

# Roots allow one CA below them: the cross-signed link to a successor or
# predecessor root (see docs/connect-ca.md, "Chain rules"). Leaves are signed
# by roots directly.
ROOT_PATH_LENGTH = 1
# Clocks of the hosts that check a certificate may run a little behind ours.
BACKDATE = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class RootMaterial:
    """A new root: its self-signed certificate and its private key (PEM, PKCS#8)."""

    cert_pem: str
    key_pem: str


@dataclass(frozen=True)
class Signer:
    """A root that can sign: its certificate and its loaded private key."""

    cert: x509.Certificate
    key: pki.PrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CAProvider(ABC):
    """What the CA manager needs from a CA implementation.

    Implementations are stateless between calls (everything they need is in
    the arguments) and thread-safe; they raise `ValueError` for arguments
    they cannot honour.
    """

    #: The `Provider` name in Consul's CA configuration ("consul" for the built-in CA).
    name: str = ""

    @abstractmethod
    def generate_root(
        self,
        trust_domain: str,
        *,
        key_type: str,
        key_bits: int,
        ttl: dt.timedelta,
    ) -> RootMaterial:
        """Create a new self-signed root CA for `trust_domain`.

        Contract: a fresh key of `key_type`/`key_bits` ("ec" 256/384, "rsa"
        2048/4096); a subject unique to this root (so that a cross-signed
        copy of it can never be confused with another root); BasicConstraints
        CA:true with path length `ROOT_PATH_LENGTH` (critical); KeyUsage
        keyCertSign + cRLSign (critical); the trust domain URI SAN
        `spiffe://<trust_domain>`; SubjectKeyIdentifier and
        AuthorityKeyIdentifier (its own); valid from `BACKDATE` ago for `ttl`.
        """

    @abstractmethod
    def sign_leaf(
        self,
        signer: Signer,
        csr: x509.CertificateSigningRequest,
        spiffe_uri: str,
        dns_names: Sequence[str],
        ttl: dt.timedelta,
        common_name: str,
        ip_addresses: Sequence[str] = (),
    ) -> x509.Certificate:
        """Sign a leaf for the CSR's public key. The caller has validated the
        CSR (signature, key type, identity, permissions); this only signs.

        Contract: `spiffe_uri` is the only URI SAN, `dns_names` the only DNS
        SANs and `ip_addresses` the only IP SANs (only the control plane's own
        server certificate asks for those); nothing is copied from the CSR
        but its public key; a fresh
        random serial; BasicConstraints CA:false (critical); KeyUsage
        digitalSignature (+ keyEncipherment for RSA keys) (critical);
        ExtendedKeyUsage serverAuth + clientAuth; SubjectKeyIdentifier of the
        leaf key and AuthorityKeyIdentifier of the signer; NotBefore
        `BACKDATE` ago; NotAfter `ttl` from now, but never past the signer's.
        """

    @abstractmethod
    def cross_sign(self, signer: Signer, other_root: x509.Certificate) -> x509.Certificate:
        """Certify another root's public key and subject with `signer`'s key.

        Contract: the result is an intermediate CA certificate with
        `other_root`'s subject, public key, SubjectKeyIdentifier and SAN,
        issued by `signer` (AuthorityKeyIdentifier = signer's), CA:true with
        path length 0, valid no longer than either root. A client that trusts
        only `signer`'s root can then verify leaves signed by `other_root`
        when the peer presents this certificate as an intermediate.
        """

    def supports_cross_signing(self) -> bool:
        """Whether `cross_sign` works; rotation without it needs ForceWithoutCrossSigning."""
        return True

    def load_signer(self, cert_pem: str, key_pem: str) -> Signer:
        """Parse a root's certificate and private key for signing."""
        return Signer(pki.load_cert(cert_pem), pki.load_key(key_pem))


def _hash_for(key: pki.PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _ski(public_key) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(signer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = signer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _leaf_key_usage(public_key) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


class BuiltinProvider(CAProvider):
    """The built-in CA (Consul's "consul" provider): keys generated and used in-process."""

    name = "consul"

    def generate_root(
        self,
        trust_domain: str,
        *,
        key_type: str,
        key_bits: int,
        ttl: dt.timedelta,
    ) -> RootMaterial:
        key = pki.generate_key(key_type, key_bits)
        serial = secrets.randbits(63) | 1  # Consul's roots carry a uint64 serial
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshweb"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"pri-{secrets.token_hex(4)}.ca.{trust_domain.split('.', 1)[0][:8]}.mesh",
                ),
            ]
        )
        now = _now()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ttl)
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=ROOT_PATH_LENGTH), critical=True
            )
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(_ski(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
            )
            .sign(key, _hash_for(key))
        )
        return RootMaterial(pki.cert_pem(cert), pki.key_pem(key))

    def sign_leaf(
        self,
        signer: Signer,
        csr: x509.CertificateSigningRequest,
        spiffe_uri: str,
        dns_names: Sequence[str],
        ttl: dt.timedelta,
        common_name: str,
        ip_addresses: Sequence[str] = (),
    ) -> x509.Certificate:
        public = csr.public_key()
        now = _now()
        not_after = min(now + ttl, signer.cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_uri)]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(public), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(_ski(public), critical=False)
            .add_extension(_aki(signer.cert), critical=False)
            .sign(signer.key, _hash_for(signer.key))
        )

    def cross_sign(self, signer: Signer, other_root: x509.Certificate) -> x509.Certificate:
        now = _now()
        public = other_root.public_key()
        san = other_root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        not_after = min(signer.cert.not_valid_after_utc, other_root.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(other_root.subject)
            .issuer_name(signer.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(san, critical=False)
            .add_extension(_ski(public), critical=False)
            .add_extension(_aki(signer.cert), critical=False)
            .sign(signer.key, _hash_for(signer.key))
        )


#: Provider name (the CA configuration's `Provider`) -> dotted path of its class.
PROVIDERS: dict[str, str] = {
    "consul": "registry.ca.provider.BuiltinProvider",
}


def get_provider(name: str) -> CAProvider:
    """The provider registered as `name`; ValueError for an unknown one."""
    path = PROVIDERS.get(name)
    if path is None:
        raise ValueError(
            f"unknown CA provider {name!r} (available: {', '.join(sorted(PROVIDERS))})"
        )
    module, _, cls = path.rpartition(".")
    return getattr(import_module(module), cls)()
