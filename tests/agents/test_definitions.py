"""Service definitions from the config dir: JSON, YAML and HCL with Consul's field names."""

from __future__ import annotations

import pytest

from meshproto.servicedefs import DefinitionError, canonical_service, load_config_file

WEB_HCL = """
service {
  name = "web"
  port = 9090
  tags = ["v1"]
  meta = { team = "core" }
  check {
    id       = "web-http"
    http     = "http://127.0.0.1:9090/health"
    interval = "5s"
  }
  connect {
    sidecar_service {
      proxy {
        upstreams = [
          { destination_name = "api", local_bind_port = 9191 }
        ]
      }
    }
  }
}
"""

WEB_YAML = """
service:
  name: web
  port: 9090
  tags: [v1]
  meta: {team: core}
  check: {id: web-http, http: "http://127.0.0.1:9090/health", interval: 5s}
  connect:
    sidecar_service:
      proxy:
        upstreams:
          - destination_name: api
            local_bind_port: 9191
"""

WEB_JSON = """
{"service": {"Name": "web", "Port": 9090, "Tags": ["v1"], "Meta": {"team": "core"},
  "Check": {"CheckID": "web-http", "HTTP": "http://127.0.0.1:9090/health", "Interval": "5s"},
  "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
    {"DestinationName": "api", "LocalBindPort": 9191}]}}}}}
"""

EXPECTED = {
    "Name": "web",
    "Port": 9090,
    "Tags": ["v1"],
    "Meta": {"team": "core"},
    "Check": {"CheckID": "web-http", "HTTP": "http://127.0.0.1:9090/health", "Interval": "5s"},
    "Connect": {
        "SidecarService": {
            "Proxy": {"Upstreams": [{"DestinationName": "api", "LocalBindPort": 9191}]}
        }
    },
}


@pytest.mark.parametrize(
    "name,text", [("web.hcl", WEB_HCL), ("web.yaml", WEB_YAML), ("web.json", WEB_JSON)]
)
def test_the_three_formats_read_as_the_same_canonical_definition(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    loaded = load_config_file(path)
    assert loaded.services == (EXPECTED,)
    assert loaded.checks == ()


def test_a_file_can_hold_node_checks_and_several_services(tmp_path):
    path = tmp_path / "host.json"
    path.write_text(
        '{"services": [{"name": "a", "port": 1}, {"name": "b", "port": 2}],'
        ' "check": {"name": "disk", "ttl": "30s"}}'
    )
    loaded = load_config_file(path)
    assert [s["Name"] for s in loaded.services] == ["a", "b"]
    assert loaded.checks == ({"Name": "disk", "TTL": "30s"},)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"service": {"port": 80}}', "Missing service name"),
        ('{"service": {"name": "a", "kind": "sidecar"}}', "Invalid service kind: 'sidecar'"),
        ('{"service": {"name": "a", "port": "eighty"}}', "Port: expected an integer"),
        (
            '{"service": {"name": "a", "check": {"http": "http://x/", "ttl": "1s"}}}',
            "only one of HTTP, TCP, GRPC, TTL, alias",
        ),
        ('{"service": {"name": "a", "check": {"tcp": "x:1"}}}', "must have an Interval"),
        ('{"service": {"name": "a", "check": {"ttl": "soon"}}}', "invalid duration"),
        (
            '{"service": {"name": "a", "connect": {"sidecar_service": {"proxy": {"upstreams": [{"destination_name": "b"}]}}}}}',
            "missing LocalBindPort",
        ),
        ("{not json", "Failed to decode"),
    ],
)
def test_a_bad_definition_is_an_error_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DefinitionError) as err:
        load_config_file(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_durations_become_go_strings_and_user_map_keys_are_kept():
    svc = canonical_service(
        {
            "name": "a",
            "meta": {"Some_Key": "v"},
            "check": {"tcp": "127.0.0.1:1", "interval": 1500000000},
        }
    )
    assert svc["Meta"] == {"Some_Key": "v"}
    assert svc["Check"]["Interval"] == "1.5s"


def test_a_config_dir_is_all_or_nothing_and_names_each_bad_file(tmp_path):
    from agents.definitions import read_config_dirs

    (tmp_path / "a.json").write_text('{"service": {"name": "a"}}')
    (tmp_path / "b.yaml").write_text("service: {name: b, port: 2}")
    (tmp_path / "notes.txt").write_text("not a definition: skipped")
    good = read_config_dirs([tmp_path])
    assert ([s["Name"] for s in good.services], good.errors) == (["a", "b"], [])
    (tmp_path / "c.hcl").write_text("service { name = ")
    bad = read_config_dirs([tmp_path])
    assert len(bad.errors) == 1
    assert bad.errors[0].startswith(f"Failed to decode {tmp_path / 'c.hcl'}")
