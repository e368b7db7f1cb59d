"""The server starts and the unmodified py-consul client can talk to it."""

import pytest

pytestmark = pytest.mark.slow


def test_py_consul_registers_and_reads_a_service(consul_client, unique):
    name = unique("web")
    assert (
        consul_client.agent.service.register(name, service_id=name, port=8080, tags=["v1"]) is True
    )
    index, nodes = consul_client.catalog.service(name)
    assert [n["ServicePort"] for n in nodes] == [8080]
    assert nodes[0]["ServiceTags"] == ["v1"]
    assert int(index) > 0
