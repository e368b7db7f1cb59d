"""Inbound authorisation: the caller's SPIFFE ID → allow or deny, cached.

One `Authorizer` is built per applied config (so a push invalidates every
cached decision at once: the new snapshot starts with an empty cache) and is
shared by the connections accepted under that config. The decision itself is
`meshproto.intentions.IntentionIndex.decide`, the same function the control
plane uses, so both always agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshproto import spiffe
from meshproto.intentions import Decision, IntentionIndex, from_consul_json
from meshproto.proxycfg import ProxyConfig

MAX_CACHED = 4096  # distinct callers; the cache is cleared (not grown) past this


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    source: str  # the caller's service name ("" when the ID is not a service's)
    reason: str
    # False when the caller's identity itself is unusable (no SPIFFE ID, not a
    # service's, another trust domain): refused before intentions are asked.
    identity_ok: bool = True
    code: str = ""  # a short metric label for identity refusals
    # HTTP listeners only: an L7 intention decides each request (`Authorizer.request`).
    l7: bool = False
    source_ns: str = "default"
    source_peer: str = ""  # the peered cluster the caller belongs to ("" for this one)


class Authorizer:
    """Decisions for one config: who may open connections to `config.service`."""

    __slots__ = ("service", "namespace", "trust_domain", "index", "_cache", "_http_cache", "_peers")

    def __init__(self, config: ProxyConfig) -> None:
        """Build from the config's intentions; IntentionError (a ValueError) if one is bad."""
        self.service = config.service
        self.namespace = config.namespace
        self.trust_domain = config.trust_domain
        self.index = IntentionIndex(
            [
                from_consul_json(
                    raw, destination_name=config.service, destination_ns=config.namespace
                )
                for raw in config.intentions
            ],
            default_allow=config.default_allow,
        )
        self._cache: dict[str, Verdict] = {}
        self._http_cache: dict[str, Verdict] = {}
        # Peered clusters' trust domains -> the peer's name (intentions' SourcePeer).
        self._peers = {t.trust_domain: t.peer for t in config.peer_trust}

    def check_http(self, uri: str | None) -> Verdict:
        """`check` for an HTTP listener: a caller whose intention is L7 is let in
        (`l7` set), and each of its requests is decided by `request`."""
        if uri is None:
            return self.check(uri)
        verdict = self._http_cache.get(uri)
        if verdict is None:
            verdict = self._decide(uri, http=True)
            if len(self._http_cache) >= MAX_CACHED:
                self._http_cache.clear()
            self._http_cache[uri] = verdict
        return verdict

    def request(
        self, verdict: Verdict, method: str, path: str, headers: dict[str, str]
    ) -> Decision:
        """The decision for one request of a caller `check_http` let in with `l7` set."""
        return self.index.decide_request(
            verdict.source, self.service, method, path, headers,
            source_ns=verdict.source_ns, destination_ns=self.namespace,
            source_peer=verdict.source_peer,
        )  # fmt: skip

    def check(self, uri: str | None) -> Verdict:
        """The verdict for a caller presenting `uri` (None: no usable SPIFFE ID)."""
        if uri is None:
            return Verdict(
                False, "", "the client certificate carries no SPIFFE ID", False, "no_spiffe_id"
            )
        verdict = self._cache.get(uri)
        if verdict is None:
            verdict = self._decide(uri)
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[uri] = verdict
        return verdict

    def _decide(self, uri: str, http: bool = False) -> Verdict:
        try:
            ident = spiffe.parse(uri)
        except spiffe.SpiffeError as exc:
            return Verdict(False, "", str(exc), False, "bad_spiffe_id")
        if not isinstance(ident, spiffe.ServiceID):
            return Verdict(False, "", f"{uri} is not a service identity", False, "bad_spiffe_id")
        peer = ""
        if ident.trust_domain != self.trust_domain:
            peer = self._peers.get(ident.trust_domain, "")
        if ident.trust_domain != self.trust_domain and not peer:
            return Verdict(
                False,
                ident.service,
                f"trust domain {ident.trust_domain} is not this mesh's ({self.trust_domain})",
                False,
                "foreign_trust_domain",
            )
        decision = self.index.decide(
            ident.service,
            self.service,
            source_ns=ident.namespace,
            destination_ns=self.namespace,
            source_peer=peer,
        )
        reason = decision.reason
        if decision.has_l7 and http:
            return Verdict(
                True, ident.service, reason, l7=True, source_ns=ident.namespace, source_peer=peer
            )
        if decision.has_l7:
            reason += " (L7 intentions need the HTTP proxy; an L4 connection is denied)"
        return Verdict(decision.allowed, ident.service, reason, source_ns=ident.namespace)
