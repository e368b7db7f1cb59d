"""The agent's scrape carries every local sidecar's metrics, labelled by proxy."""

from agents.metrics import merge_scrapes, with_label

SIDECAR = """# HELP mesh_sidecar_connections_total Connections opened.
# TYPE mesh_sidecar_connections_total counter
mesh_sidecar_connections_total{direction="inbound"} 3
mesh_sidecar_config_version 12
"""


def test_each_sample_gains_the_proxy_label():
    meta, samples = with_label(SIDECAR, "proxy_id", "web-sidecar-proxy")
    assert meta == [
        "# HELP mesh_sidecar_connections_total Connections opened.",
        "# TYPE mesh_sidecar_connections_total counter",
    ]
    assert samples == [
        'mesh_sidecar_connections_total{proxy_id="web-sidecar-proxy",direction="inbound"} 3',
        'mesh_sidecar_config_version{proxy_id="web-sidecar-proxy"} 12',
    ]


def test_two_sidecars_share_one_help_line_and_keep_their_samples():
    own = b"mesh_agent_connected 1\n"
    merged = merge_scrapes(
        own, {"web-sidecar-proxy": SIDECAR, "api-sidecar-proxy": SIDECAR}
    ).decode()
    assert merged.startswith("mesh_agent_connected 1\n")
    assert merged.count("# HELP mesh_sidecar_connections_total") == 1
    assert 'mesh_sidecar_config_version{proxy_id="api-sidecar-proxy"} 12' in merged
    assert 'mesh_sidecar_config_version{proxy_id="web-sidecar-proxy"} 12' in merged


def test_no_sidecars_leaves_the_agent_scrape_as_it_is():
    assert merge_scrapes(b"x 1\n", {}) == b"x 1\n"
