"""The CA manager: the one writer of CA state (trust domain, configuration, roots, issued leaves).

States (derived from the rows, checked under the write lock by every transition):

    UNINITIALIZED --ensure_initialized--> READY --rotate / key-type change--> ROTATED
                                            ^                                    |
                                            +------- retire_expired_roots -------+
    (ROTATED --rotate--> ROTATED: another rotation before the old roots retired)

- READY: one active root, nothing else in the trust bundle.
- ROTATED: one active root plus earlier roots kept (Active=false) until the
  last leaf they signed has expired (`retire_after`), then removed.

Every transition runs in one `Change`, which takes the global index row lock
(PostgreSQL) or the database write lock (SQLite) first, so two servers
starting or rotating at once serialise, and each re-reads the state after
taking the lock: `ensure_initialized` is idempotent, and a transition that
finds the state moved on does the right thing for the state it finds. Slow
work (generating an RSA key) is done before the lock is taken.

Key material never leaves this module and the provider unencrypted; roots'
private keys are stored with `registry.ca.secrets`.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Max
from django.utils import timezone

from meshproto import pki
from registry import topics as topic
from registry.ca import secrets
from registry.ca.provider import PROVIDERS, CAProvider, RootMaterial, Signer, get_provider
from registry.decode import parse_duration
from registry.errors import BadRequest, Conflict
from registry.models import CAConfig, CARoot, ClusterIdentity, IssuedCert
from registry.txn import Change

log = logging.getLogger(__name__)

ROOT_NAME = "meshweb CA Primary Cert"
TOPIC_ROOTS = topic.CA_ROOTS
TOPIC_CONFIG = topic.CA_CONFIG

# Consul's LeafCertTTL bounds (MESH_CA_LEAF_TTL may go below, for tests).
MIN_LEAF_TTL = 3600.0
MAX_LEAF_TTL = 8760 * 3600.0
MAX_ROOT_TTL = 100 * 8760 * 3600.0
KEY_SIZES = {"ec": (256, 384), "rsa": (2048, 4096)}


class CAState(enum.Enum):
    UNINITIALIZED = "uninitialized"
    READY = "ready"
    ROTATED = "rotated"


# --- configuration ---------------------------------------------------------------------


def csr_rate_default() -> float:
    raw = str(settings.MESH_CA_CSR_RATE).strip()
    try:
        rate = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"MESH_CA_CSR_RATE={raw!r} is not a number") from None
    if rate < 0 or math.isnan(rate) or math.isinf(rate):
        raise ImproperlyConfigured(f"MESH_CA_CSR_RATE={raw!r} must be 0 (no limit) or more")
    return rate


def leaf_ttl_override() -> float | None:
    """MESH_CA_LEAF_TTL in seconds (None when unset): wins over LeafCertTTL, for tests."""
    raw = (settings.MESH_CA_LEAF_TTL or "").strip()
    if not raw:
        return None
    try:
        seconds = parse_duration(raw)
    except ValueError:
        raise ImproperlyConfigured(
            f'MESH_CA_LEAF_TTL={raw!r} is not a duration ("5s", "72h")'
        ) from None
    if seconds < 1:
        raise ImproperlyConfigured(f"MESH_CA_LEAF_TTL={raw!r} must be at least 1s")
    return seconds


def _number(value: float) -> int | float:
    """50.0 -> 50, as Go's JSON prints a float64."""
    return int(value) if float(value).is_integer() else float(value)


def default_config() -> dict[str, Any]:
    """Consul's built-in provider defaults, with the CSR limits from the environment."""
    return {
        "LeafCertTTL": "72h",
        "PrivateKeyType": "ec",
        "PrivateKeyBits": 256,
        "RotationPeriod": "2160h",
        "IntermediateCertTTL": "8760h",
        "RootCertTTL": "87600h",
        "CSRMaxPerSecond": _number(csr_rate_default()),
        "CSRMaxConcurrent": settings.MESH_CA_CSR_MAX_CONCURRENT,
    }


_DURATION_KEYS = ("LeafCertTTL", "RotationPeriod", "IntermediateCertTTL", "RootCertTTL")
# Keys Consul's built-in provider accepts that meshweb does not (importing a root).
_UNSUPPORTED_KEYS = {"privatekey": "PrivateKey", "rootcert": "RootCert"}


def _canonical_keys() -> dict[str, str]:
    return {k.lower().replace("_", ""): k for k in default_config()}


@dataclass(frozen=True)
class Settings:
    """A validated CA configuration, in the units code needs."""

    leaf_ttl: float
    key_type: str
    key_bits: int
    root_ttl: float
    csr_rate: float
    csr_queue: int

    @property
    def effective_leaf_ttl(self) -> float:
        return leaf_ttl_override() or self.leaf_ttl


def validate_config(raw: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A PUT's `Config` map as stored: Consul's key names; what it does not give
    keeps its value in `base` (the stored configuration), else the default.

    A new `PrivateKeyType` without `PrivateKeyBits` takes that type's default
    size. Keys match case-insensitively (as Consul's decoder); unknown keys,
    wrong types and out-of-range values are a 400 naming the key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest("Config: expected an object")
    canonical = _canonical_keys()
    out = {**default_config(), **(base or {})}
    given = {canonical.get(str(k).lower().replace("_", "")) for k in raw}
    for key, value in raw.items():
        folded = str(key).lower().replace("_", "")
        if folded in _UNSUPPORTED_KEYS:
            if value in (None, ""):
                continue
            raise BadRequest(
                f"Config.{_UNSUPPORTED_KEYS[folded]}: importing an existing root is not supported"
            )
        name = canonical.get(folded)
        if name is None:
            raise BadRequest(
                f"Config: unknown field {key!r} (known: {', '.join(sorted(canonical.values()))})"
            )
        out[name] = value
    for name in _DURATION_KEYS:
        value = out[name]
        if not isinstance(value, str):
            raise BadRequest(f'Config.{name}: expected a duration string like "72h"')
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise BadRequest(f"Config.{name}: invalid duration {value!r}") from None
        if seconds < 0:
            raise BadRequest(f"Config.{name}: must not be negative")
    leaf = parse_duration(out["LeafCertTTL"])
    if not MIN_LEAF_TTL <= leaf <= MAX_LEAF_TTL:
        raise BadRequest("Config.LeafCertTTL: must be between 1h0m0s and 8760h0m0s")
    root = parse_duration(out["RootCertTTL"])
    if not leaf < root <= MAX_ROOT_TTL:
        raise BadRequest(
            "Config.RootCertTTL: must be longer than LeafCertTTL (and at most 100 years)"
        )
    key_type = out["PrivateKeyType"]
    sizes = KEY_SIZES.get(key_type, ())
    if "PrivateKeyType" in given and "PrivateKeyBits" not in given and sizes:
        out["PrivateKeyBits"] = (
            sizes[0] if out["PrivateKeyBits"] not in sizes else out["PrivateKeyBits"]
        )
    if key_type not in KEY_SIZES:
        raise BadRequest(
            f'Config.PrivateKeyType: {key_type!r} is not supported (use "ec" or "rsa")'
        )
    bits = out["PrivateKeyBits"]
    if isinstance(bits, bool) or not isinstance(bits, int | float) or int(bits) != bits:
        raise BadRequest("Config.PrivateKeyBits: expected an integer")
    out["PrivateKeyBits"] = int(bits)
    if out["PrivateKeyBits"] not in KEY_SIZES[key_type]:
        sizes = " or ".join(str(b) for b in KEY_SIZES[key_type])
        raise BadRequest(f"Config.PrivateKeyBits: {key_type} keys must be {sizes} bits")
    rate = out["CSRMaxPerSecond"]
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0 or math.isinf(rate):
        raise BadRequest("Config.CSRMaxPerSecond: expected a number, 0 (no limit) or more")
    queue = out["CSRMaxConcurrent"]
    if (
        isinstance(queue, bool)
        or not isinstance(queue, int | float)
        or queue < 0
        or int(queue) != queue
    ):
        raise BadRequest("Config.CSRMaxConcurrent: expected an integer, 0 or more")
    out["CSRMaxConcurrent"] = int(queue)
    out["CSRMaxPerSecond"] = _number(rate)
    return out


def settings_of(config: dict[str, Any]) -> Settings:
    merged = {**default_config(), **config}
    return Settings(
        leaf_ttl=parse_duration(merged["LeafCertTTL"]),
        key_type=merged["PrivateKeyType"],
        key_bits=int(merged["PrivateKeyBits"]),
        root_ttl=parse_duration(merged["RootCertTTL"]),
        csr_rate=float(merged["CSRMaxPerSecond"]),
        csr_queue=int(merged["CSRMaxConcurrent"]),
    )


# --- helpers ---------------------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    """Consul's root ID: the SHA-1 fingerprint, colon hex."""
    return ":".join(f"{b:02x}" for b in cert.fingerprint(hashes.SHA1()))


def _aki_of(cert: x509.Certificate) -> str | None:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return ":".join(f"{b:02x}" for b in aki.key_identifier or b"")


def _root_row(material: RootMaterial, index: int, *, active: bool) -> CARoot:
    cert = pki.load_cert(material.cert_pem)
    key = pki.load_key(material.key_pem)
    key_type = "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa"
    return CARoot(
        id=fingerprint(cert),
        name=ROOT_NAME,
        serial_number=str(cert.serial_number),
        signing_key_id=pki.key_id(cert.public_key()),
        root_cert=material.cert_pem,
        intermediate_certs=[],
        private_key_encrypted=secrets.encrypt(material.key_pem),
        private_key_type=key_type,
        private_key_bits=key.curve.key_size if key_type == "ec" else key.key_size,
        active=active,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        create_index=index,
        modify_index=index,
    )


def load_signer(root: CARoot, provider: CAProvider | None = None) -> Signer:
    """A root's certificate and decrypted key, ready to sign."""
    provider = provider or get_provider("consul")
    return provider.load_signer(root.root_cert, secrets.decrypt(root.private_key_encrypted))


def _root_audit(root: CARoot) -> dict[str, Any]:
    return {
        "ID": root.id,
        "Active": root.active,
        "PrivateKeyType": root.private_key_type,
        "PrivateKeyBits": root.private_key_bits,
        "NotAfter": root.not_after,
        "RetireAfter": root.retire_after,
    }


def _config_audit(row: CAConfig) -> dict[str, Any]:
    return {
        "Provider": row.provider,
        "Config": row.config,
        "ForceWithoutCrossSigning": row.force_without_cross_signing,
    }


# --- the manager -----------------------------------------------------------------------


class CAManager:
    """The transitions of the CA's state machine; see the module docstring."""

    # How often `retire_expired_roots` looks at the database at most (per process).
    RETIRE_CHECK_SECONDS = 5.0

    def __init__(self) -> None:
        self._next_retire_check = 0.0
        self._retire_lock = threading.Lock()

    # -- reads --------------------------------------------------------------------------

    def state(self) -> CAState:
        roots = list(CARoot.objects.values_list("active", flat=True))
        if not ClusterIdentity.objects.filter(id=1).exists() or sum(roots) != 1:
            return CAState.UNINITIALIZED
        return CAState.READY if len(roots) == 1 else CAState.ROTATED

    def config_row(self) -> CAConfig:
        row = CAConfig.objects.filter(id=1).first()
        if row is None:
            self.ensure_initialized()
            row = CAConfig.objects.get(id=1)
        return row

    def settings(self) -> Settings:
        return settings_of(self.config_row().config)

    # -- UNINITIALIZED -> READY -------------------------------------------------------

    def ensure_initialized(self) -> bool:
        """Create the trust domain, the configuration and the first root, once.

        Safe when several servers start at once on one database: the loser
        of the race finds the winner's rows under the lock and keeps them.
        Returns True when this call initialized the CA. Also checks that the
        active root's key decrypts with the configured key, so a wrong
        MESH_ENCRYPTION_KEY stops start-up instead of the first signing.
        """
        csr_rate_default()  # a bad MESH_CA_* value stops start-up, naming the setting
        leaf_ttl_override()
        if self.state() is not CAState.UNINITIALIZED:
            self._check_key()
            return False
        cfg = settings_of(default_config())
        cluster_id = str(uuid.uuid4())
        material = get_provider("consul").generate_root(
            f"{cluster_id}.mesh",
            key_type=cfg.key_type,
            key_bits=cfg.key_bits,
            ttl=dt.timedelta(seconds=cfg.root_ttl),
        )
        with Change() as w:
            identity = ClusterIdentity.objects.filter(id=1).first()
            if identity is not None and CARoot.objects.filter(active=True).exists():
                return False  # another server initialized it while we generated our root
            if identity is None:
                identity = ClusterIdentity.objects.create(
                    id=1, cluster_id=cluster_id, trust_domain=f"{cluster_id}.mesh"
                )
            if identity.trust_domain != f"{cluster_id}.mesh":
                # The identity survived without a root (cannot happen through the
                # API): the root must name the trust domain that exists.
                material = get_provider("consul").generate_root(
                    identity.trust_domain,
                    key_type=cfg.key_type,
                    key_bits=cfg.key_bits,
                    ttl=dt.timedelta(seconds=cfg.root_ttl),
                )
            if not CAConfig.objects.filter(id=1).exists():
                CAConfig.objects.create(
                    id=1,
                    provider="consul",
                    config=default_config(),
                    create_index=w.index,
                    modify_index=w.index,
                )
            root = _root_row(material, w.index, active=True)
            root.save(force_insert=True)
            w.touch(TOPIC_ROOTS, TOPIC_CONFIG)
            w.audit("ca.initialize", "ca-root", root.id, None, _root_audit(root))
        log.info("Connect CA initialized: trust domain %s, root %s", identity.trust_domain, root.id)
        return True

    def _check_key(self) -> None:
        root = CARoot.objects.filter(active=True).first()
        if root is None:
            return
        try:
            secrets.decrypt(root.private_key_encrypted)
        except secrets.KeyDecryptionError as exc:
            raise ImproperlyConfigured(str(exc)) from None

    # -- READY | ROTATED -> ROTATED -----------------------------------------------------

    def rotate(self) -> CARoot:
        """Make a new active root of the configured key type, cross-signed both ways
        with the current one, which stays trusted until its last leaf expired."""
        self.ensure_initialized()
        cfg = self.settings()
        trust_domain = ClusterIdentity.objects.get(id=1).trust_domain
        material = self._generate(trust_domain, cfg)
        with Change() as w:
            cfg_now = settings_of(CAConfig.objects.get(id=1).config)
            if (cfg_now.key_type, cfg_now.key_bits) != (cfg.key_type, cfg.key_bits):
                material = self._generate(trust_domain, cfg_now)  # reconfigured meanwhile
            return self._rotate_locked(w, material, cfg_now)

    def _generate(self, trust_domain: str, cfg: Settings) -> RootMaterial:
        return get_provider(self.config_row().provider).generate_root(
            trust_domain,
            key_type=cfg.key_type,
            key_bits=cfg.key_bits,
            ttl=dt.timedelta(seconds=cfg.root_ttl),
        )

    def _rotate_locked(self, w: Change, material: RootMaterial, cfg: Settings) -> CARoot:
        old = CARoot.objects.filter(active=True).first()
        if old is None:
            raise Conflict("The CA is not initialized")
        row = CAConfig.objects.get(id=1)
        provider = get_provider(row.provider)
        new = _root_row(material, w.index, active=True)
        now = timezone.now()
        before = {"ActiveRootID": old.id}
        if provider.supports_cross_signing():
            old_signer = load_signer(old, provider)
            new_signer = provider.load_signer(material.cert_pem, material.key_pem)
            new.intermediate_certs = [
                pki.cert_pem(provider.cross_sign(old_signer, new_signer.cert))
            ]
            old.intermediate_certs = [
                *old.intermediate_certs,
                pki.cert_pem(provider.cross_sign(new_signer, old_signer.cert)),
            ]
        elif not row.force_without_cross_signing:
            raise BadRequest(
                "The CA provider does not support cross-signing; set ForceWithoutCrossSigning "
                "to rotate anyway (connections using the old root will break)"
            )
        old.active = False
        old.rotated_out_at = now
        old.retire_after = self._retire_after(old, cfg, now)
        old.modify_index = w.index
        old.save()
        new.save(force_insert=True)
        w.touch(TOPIC_ROOTS)
        w.audit(
            "ca.rotate",
            "ca-root",
            new.id,
            before,
            {"ActiveRootID": new.id, "Root": _root_audit(new), "Previous": _root_audit(old)},
        )
        self._next_retire_check = 0.0
        log.info(
            "Connect CA rotated: root %s replaces %s (retired after %s)",
            new.id,
            old.id,
            old.retire_after,
        )
        return new

    @staticmethod
    def _retire_after(old: CARoot, cfg: Settings, now: dt.datetime) -> dt.datetime:
        """When the old root's last leaf will have expired: the longest leaf it may
        still sign (a signing that raced the rotation) or has signed, plus a margin
        for clocks that run behind."""
        ttl = cfg.effective_leaf_ttl
        margin = dt.timedelta(seconds=min(60.0, ttl))
        latest = IssuedCert.objects.filter(root=old).aggregate(m=Max("not_after"))["m"]
        due = now + dt.timedelta(seconds=ttl)
        if latest is not None and latest > due:
            due = latest
        return min(due + margin, old.not_after)

    # -- configuration updates (may rotate) ---------------------------------------------

    def update_config(
        self,
        provider: str | None,
        config: Any,
        force_without_cross_signing: bool | None = None,
    ) -> bool:
        """Store a new configuration; a new key type or size rotates to a root of
        that kind in the same transaction, as Consul does. Returns True if it rotated.

        Only what is given changes: a provider, `Config` key or flag left out
        (None) keeps its stored value, so a partial body never resets the rest
        to defaults. An update that changes nothing writes nothing (as Consul's).
        """
        if provider is not None and provider not in PROVIDERS:
            raise BadRequest(
                f"Provider: unknown CA provider {provider!r} (available: {', '.join(sorted(PROVIDERS))})"
            )
        self.ensure_initialized()
        current = self.config_row()
        stored = validate_config(config, base=current.config)
        new_cfg = settings_of(stored)
        if (
            (provider or current.provider) == current.provider
            and stored == current.config
            and force_without_cross_signing in (None, current.force_without_cross_signing)
        ):
            return False  # nothing changes: no index, no announcement, no audit entry
        trust_domain = ClusterIdentity.objects.get(id=1).trust_domain
        active = CARoot.objects.filter(active=True).first()
        needs_root = active is None or (active.private_key_type, active.private_key_bits) != (
            new_cfg.key_type,
            new_cfg.key_bits,
        )
        material = None
        if needs_root:
            material = get_provider(provider or current.provider).generate_root(
                trust_domain,
                key_type=new_cfg.key_type,
                key_bits=new_cfg.key_bits,
                ttl=dt.timedelta(seconds=new_cfg.root_ttl),
            )
        with Change() as w:
            row = CAConfig.objects.get(id=1)
            if row.config != current.config:
                # Another update landed since we read: apply this one on top of it.
                stored = validate_config(config, base=row.config)
                if settings_of(stored) != new_cfg:
                    new_cfg, material = settings_of(stored), None
            force = (
                row.force_without_cross_signing
                if force_without_cross_signing is None
                else bool(force_without_cross_signing)
            )
            before = _config_audit(row)
            row.provider = provider or row.provider
            row.config = stored
            row.force_without_cross_signing = force
            row.modify_index = w.index
            row.save()
            w.touch(TOPIC_CONFIG)
            w.audit("ca.configure", "ca-config", "1", before, _config_audit(row))
            active = CARoot.objects.filter(active=True).first()
            rotated = False
            if active is not None and (active.private_key_type, active.private_key_bits) != (
                new_cfg.key_type,
                new_cfg.key_bits,
            ):
                if material is None:  # the active root changed while we were not locked
                    material = self._generate(trust_domain, new_cfg)
                self._rotate_locked(w, material, new_cfg)
                rotated = True
        return rotated

    # -- ROTATED -> READY -----------------------------------------------------------------

    def retire_expired_roots(self, *, force: bool = False) -> int:
        """Remove inactive roots whose `retire_after` passed and whose leaves all
        expired, and the cross-signed certificates that name them.

        Called by every background tick: it looks at the database at most every
        RETIRE_CHECK_SECONDS per process (or when a rotation here may have made
        work, or with `force`), so an idle tick costs nothing.
        """
        now_mono = time.monotonic()
        with self._retire_lock:
            if not force and now_mono < self._next_retire_check:
                return 0
            self._next_retire_check = now_mono + self.RETIRE_CHECK_SECONDS
        now = timezone.now()
        due = list(
            CARoot.objects.filter(active=False, retire_after__lte=now).values_list("id", flat=True)
        )
        retired = 0
        for root_id in due:
            latest = IssuedCert.objects.filter(root_id=root_id).aggregate(m=Max("not_after"))["m"]
            if latest is not None and latest > now:
                # A leaf signed while the rotation committed outlives the estimate: wait for it.
                CARoot.objects.filter(id=root_id).update(retire_after=latest)
                continue
            with Change() as w:
                root = CARoot.objects.filter(id=root_id, active=False).first()
                if root is None:
                    continue  # another worker retired it
                gone_key = root.signing_key_id
                for other in CARoot.objects.exclude(id=root_id):
                    kept = [
                        pem
                        for pem in other.intermediate_certs
                        if _aki_of(pki.load_cert(pem)) != gone_key
                        and pki.key_id(pki.load_cert(pem).public_key()) != gone_key
                    ]
                    if kept != other.intermediate_certs:
                        other.intermediate_certs = kept
                        other.modify_index = w.index
                        other.save(update_fields=["intermediate_certs", "modify_index"])
                before = _root_audit(root)
                root.delete()
                w.touch(TOPIC_ROOTS)
                w.audit("ca.retire", "ca-root", root_id, before, None)
            log.info("Connect CA root %s retired (its last leaf expired)", root_id)
            retired += 1
        return retired


manager = CAManager()


def ensure_initialized() -> bool:
    """Initialize the Connect CA on first start (see `CAManager.ensure_initialized`)."""
    return manager.ensure_initialized()
