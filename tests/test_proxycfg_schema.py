"""The proxy-config schema round-trips through JSON and refuses malformed input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from meshproto.proxycfg import (
    Cluster,
    Endpoint,
    Gateway,
    Inbound,
    ProxyConfig,
    Route,
    RouteMatch,
    Upstream,
    WeightedCluster,
)


def sample() -> ProxyConfig:
    api = Cluster(
        name="api.default.dc1",
        service="api",
        datacenter="dc1",
        spiffe_id="spiffe://t.mesh/ns/default/dc/dc1/svc/api",
        sni="api.default.dc1.internal.t.mesh",
        endpoints=(Endpoint("10.0.0.2", 21000, node="b", service_id="api-sidecar-proxy"),),
    )
    canary = Cluster(
        name="v2.api.default.dc2",
        service="api",
        datacenter="dc2",
        subset="v2",
        spiffe_id="spiffe://t.mesh/ns/default/dc/dc2/svc/api",
        sni="v2.api.default.dc2.internal.t.mesh",
        gateway=Gateway("192.0.2.1", 8443),
    )
    route = Route(
        match=RouteMatch(path_prefix="/"),
        splits=(WeightedCluster(api.name, 90.0), WeightedCluster(canary.name, 10.0)),
    )
    return ProxyConfig(
        version=42,
        proxy_id="web-sidecar-proxy",
        service="web",
        service_id="web",
        node="a",
        datacenter="dc1",
        trust_domain="t.mesh",
        spiffe_id="spiffe://t.mesh/ns/default/dc/dc1/svc/web",
        inbound=Inbound("0.0.0.0", 21000, "127.0.0.1", 8080),
        upstreams=(
            Upstream("api", "127.0.0.1", 9191, "http", routes=(route,), clusters=(api, canary)),
        ),
        intentions=({"SourceName": "lb", "Action": "allow"},),
        roots=("-----BEGIN CERTIFICATE-----\n...",),
    )


def test_it_round_trips_through_json_bytes():
    cfg = sample()
    assert ProxyConfig.loads(cfg.dumps()) == cfg


def test_serialisation_is_stable_for_equal_configs():
    assert sample().dumps() == sample().dumps()


def test_the_bytes_are_the_sorted_compact_json_of_the_config_with_shared_upstreams_spliced_in():
    cfg = dataclasses.replace(sample(), intentions=({"SourceName": "caf\u00e9", "Action": "deny"},))
    expected = json.dumps(cfg.to_json(), separators=(",", ":"), sort_keys=True).encode()
    assert cfg.dumps() == expected
    # A second config sharing the Upstream object reuses its encoded text.
    other = dataclasses.replace(cfg, proxy_id="web-2-sidecar-proxy", version=43)
    assert other.upstreams[0] is cfg.upstreams[0]
    assert (
        other.dumps() == json.dumps(other.to_json(), separators=(",", ":"), sort_keys=True).encode()
    )
    assert json.loads(other.dumps())["proxy_id"] == "web-2-sidecar-proxy"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(extra=1), "unknown field(s) extra"),
        (lambda d: d.update(version="42"), "config.version: expected an integer"),
        (lambda d: d["inbound"].update(port=None), "config.inbound.port: expected an integer"),
        (lambda d: d["upstreams"][0]["clusters"][0].update(endpoints={}), "expected a list"),
        (lambda d: d.update(schema=99), "unsupported proxy config schema"),
    ],
)
def test_malformed_configs_are_refused_with_the_path(mutate, message):
    data = sample().to_json()
    mutate(data)
    with pytest.raises(ValueError) as err:
        ProxyConfig.from_json(data)
    assert message in str(err.value)


def test_garbage_bytes_are_refused():
    with pytest.raises(ValueError):
        ProxyConfig.loads(b"\xff not json")
