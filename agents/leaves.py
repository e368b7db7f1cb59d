"""Leaf certificates made on this host: the key is generated here, the CSR signed
by the control plane (`SignLeaf`), the key never leaves.

Each proxy's leaf is renewed at a random point between 50 % and 80 % of its
lifetime, so a fleet does not renew at once; a failed signing is retried
with backoff, and the old leaf keeps serving until it expires. Leaves are
kept in `<data-dir>/leaves/` (0600) so that a restarted agent, or one that
cannot reach the control plane, hands the sidecar what it had.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from agents.client import Backoff, write_private
from meshproto import pki

log = logging.getLogger("mesh.agent.leaves")

# (csr_pem, service) -> (cert_pem, roots_pem, serial, not_after_unix)
Signer = Callable[[str, str], Awaitable[tuple[str, tuple[str, ...]]]]


@dataclass(frozen=True)
class Leaf:
    """A signed leaf and the key made for it here."""

    service: str
    spiffe_id: str
    cert_pem: str
    key_pem: str
    serial: str
    not_before: float  # unix seconds
    not_after: float
    received_at: float = 0.0  # unix seconds this agent got it signed (0: unknown, e.g. from disk)

    @classmethod
    def of(cls, service: str, cert_pem: str, key_pem: str) -> Leaf:
        info = pki.info(pki.load_cert(cert_pem))
        return cls(
            service=service,
            spiffe_id=info.spiffe_id or "",
            cert_pem=cert_pem,
            key_pem=key_pem,
            serial=info.serial,
            not_before=info.not_before.timestamp(),
            not_after=info.not_after.timestamp(),
        )

    def renew_at(self, rng: random.Random | None = None) -> float:
        """A random point between 50 % and 80 % of the lifetime (unix seconds).

        The lifetime counts from when the leaf was received: the CA backdates
        `not_before` (a minute, for clock skew), which for a leaf of a few
        seconds would put the point in the past and renew it over and over."""
        return renewal_point(self.not_before, self.not_after, self.received_at, rng)

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    def json(self) -> dict:
        return {"service": self.service, "cert": self.cert_pem, "key": self.key_pem}


def renewal_point(
    not_before: float, not_after: float, received_at: float = 0.0, rng: random.Random | None = None
) -> float:
    """A random point between 50 % and 80 % of a certificate's life since it was received
    (`received_at`, unix seconds; 0 or earlier than `not_before`: since `not_before`)."""
    start = max(not_before, min(received_at, not_after))
    return start + (not_after - start) * (rng or random).uniform(0.5, 0.8)


async def make_leaf(sign: Signer, service: str, spiffe_id: str) -> tuple[Leaf, tuple[str, ...]]:
    """Generate a key here and have a CSR for `spiffe_id` signed; returns the leaf and roots."""
    key = pki.generate_key()
    csr = pki.make_csr(key, spiffe_id)
    cert_pem, roots = await sign(csr, service)
    leaf = dataclasses.replace(
        Leaf.of(service, cert_pem, pki.key_pem(key)),
        received_at=dt.datetime.now(dt.UTC).timestamp(),
    )
    cert = pki.load_cert(cert_pem)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError("SignLeaf returned a certificate for another key")
    return leaf, roots


def issued_by(cert_pem: str, root) -> bool:
    """Whether the leaf's first certificate was signed directly by `root`."""
    try:
        pki.load_cert(cert_pem).verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class LeafKeeper:
    """Keeps one leaf per proxy fresh; calls `on_leaf(proxy_id, leaf, roots)` on every new one."""

    def __init__(
        self,
        directory: Path,
        sign: Signer,
        on_leaf: Callable[[str, Leaf, tuple[str, ...]], None],
    ) -> None:
        self.dir = directory
        self.sign = sign
        self.on_leaf = on_leaf
        self.leaves: dict[str, Leaf] = {}
        self.tasks: dict[str, tuple[str, asyncio.Task]] = {}
        self.renewals = 0

    def ensure(self, wanted: dict[str, tuple[str, str]]) -> None:
        """`wanted`: proxy ID -> (service, SPIFFE ID). Starts and stops keepers to match."""
        for pid, (sid, task) in list(self.tasks.items()):
            if pid not in wanted or wanted[pid][1] != sid:
                task.cancel()
                del self.tasks[pid]
                self.leaves.pop(pid, None)
        for pid, (service, spiffe_id) in wanted.items():
            if pid not in self.tasks:
                task = asyncio.get_running_loop().create_task(
                    self._keep(pid, service, spiffe_id), name=f"leaf:{pid}"
                )
                self.tasks[pid] = (spiffe_id, task)

    def _path(self, proxy_id: str) -> Path:
        return self.dir / f"{proxy_id}.json"

    def _load(self, proxy_id: str, service: str, spiffe_id: str) -> Leaf | None:
        try:
            data = json.loads(self._path(proxy_id).read_text())
            leaf = Leaf.of(service, data["cert"], data["key"])
        except (OSError, ValueError, KeyError):
            return None
        if leaf.spiffe_id != spiffe_id:
            return None
        return leaf

    def _save(self, proxy_id: str, leaf: Leaf) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self._path(proxy_id), json.dumps(leaf.json()))

    def rotate(self, active_root_pem: str, spread: float = 5.0) -> int:
        """The active CA root changed: re-sign, within `spread` seconds (jittered so
        a fleet does not sign at once), every leaf the new root did not issue.
        The old leaves keep working meanwhile (the old root stays trusted)."""
        root = pki.load_cert(active_root_pem)
        moved = 0
        for pid, (spiffe_id, task) in list(self.tasks.items()):
            leaf = self.leaves.get(pid)
            if leaf is None or issued_by(leaf.cert_pem, root):
                continue
            task.cancel()
            new = asyncio.get_running_loop().create_task(
                self._keep(pid, leaf.service, spiffe_id, random.uniform(0, spread)),
                name=f"leaf:{pid}",
            )
            self.tasks[pid] = (spiffe_id, new)
            moved += 1
        return moved

    async def _keep(
        self, proxy_id: str, service: str, spiffe_id: str, force_after: float | None = None
    ) -> None:
        loop_time = asyncio.get_running_loop().time
        leaf = self._load(proxy_id, service, spiffe_id)
        now = dt.datetime.now(dt.UTC).timestamp()
        if leaf is not None and not leaf.expired(now):
            self.leaves[proxy_id] = leaf
            self.on_leaf(proxy_id, leaf, ())
            renew_at = leaf.renew_at()
            if force_after is not None:
                renew_at = min(renew_at, now + force_after)
        else:
            renew_at = 0.0
        backoff = Backoff(base=0.5, cap=15.0)
        while True:
            now = dt.datetime.now(dt.UTC).timestamp()
            if now < renew_at:
                # Sleep in bounded steps: a suspended host wakes up to a correct clock.
                await asyncio.sleep(min(renew_at - now, 30.0))
                continue
            started = loop_time()
            try:
                new, roots = await make_leaf(self.sign, service, spiffe_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning(
                    "leaf signing failed; retrying",
                    extra={"proxy_id": proxy_id, "error": str(exc), "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.renewals += 1
            self.leaves[proxy_id] = new
            self._save(proxy_id, new)
            log.info(
                "leaf signed",
                extra={
                    "proxy_id": proxy_id,
                    "serial": new.serial,
                    "not_after": new.not_after,
                    "took_ms": round((loop_time() - started) * 1000, 1),
                },
            )
            self.on_leaf(proxy_id, new, roots)
            renew_at = new.renew_at()

    async def close(self) -> None:
        for _, task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in self.tasks.values()), return_exceptions=True)
        self.tasks.clear()
