"""The `mesh` client commands, run as real subprocesses against real servers.

Each test runs `python -m meshweb.cli ...` with the environment pointing at a
server fixture and checks what a user sees: stdout, stderr and the exit code.
No command may ever end in a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import consul
import pytest

from tests.support.servers import ROOT, free_port, make_server

pytestmark = pytest.mark.slow


def run_mesh(
    *args: str,
    server=None,
    token: str | None = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`mesh ARGS...` as a user runs it; the server's address comes from the environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
    if server is not None:
        base["MESH_HTTP_ADDR"] = server.addr
    if token:
        base["MESH_HTTP_TOKEN"] = token
    base.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "meshweb.cli", *args],
        cwd=ROOT,
        env=base,
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    result = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode()
    )
    result.raw_stdout = proc.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


@pytest.fixture(scope="module")
def local_node(server) -> dict:
    with server.client() as c:
        config = c.get("/v1/agent/self").json()["Config"]
        node = c.get(f"/v1/catalog/node/{config['NodeName']}").json()["Node"]
    return node


# --------------------------------------------------------------------------- help and usage

COMMANDS = [
    ["acl"],
    ["acl", "bootstrap"],
    ["acl", "token"],
    ["acl", "token", "create"],
    ["acl", "token", "list"],
    ["acl", "policy"],
    ["acl", "policy", "create"],
    ["acl", "policy", "list"],
    ["catalog"],
    ["catalog", "services"],
    ["catalog", "nodes"],
    ["catalog", "datacenters"],
    ["kv"],
    ["kv", "get"],
    ["kv", "put"],
    ["kv", "delete"],
    ["members"],
    ["services"],
    ["services", "register"],
    ["services", "deregister"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_and_group_explains_itself_with_examples(command):
    text = ok(run_mesh(*command, "--help"))
    assert text.startswith(f"usage: mesh {' '.join(command)} ")
    assert "examples:\n  $ mesh " + command[0] in text
    # The description's first line is the one-line synopsis.
    synopsis = text.split("\n\n")[1].splitlines()[0]
    assert synopsis and synopsis[0].isupper()


@pytest.mark.parametrize(
    "command",
    [
        c
        for c in COMMANDS
        if c
        not in (["acl"], ["acl", "token"], ["acl", "policy"], ["catalog"], ["kv"], ["services"])
    ],
    ids=" ".join,
)
def test_every_command_takes_consuls_global_options_single_or_double_dash(command):
    text = ok(run_mesh(*command, "-h"))
    for option in ("-http-addr", "--http-addr", "-token", "--token", "-datacenter"):
        assert re.search(rf"(^|[\s,]){option}\b", text), option


def test_the_top_level_help_lists_the_client_commands():
    text = ok(run_mesh("--help"))
    for name in ("acl", "catalog", "kv", "members", "services", "server"):
        assert re.search(rf"^\s+{name}\s", text, re.M), name


def test_a_group_without_a_subcommand_shows_its_subcommands_and_fails():
    result = run_mesh("kv")
    assert result.returncode == 1
    assert "usage: mesh kv" in result.stderr
    for sub in ("get", "put", "delete"):
        assert re.search(rf"^\s+{sub}\s", result.stderr, re.M)


def test_an_unknown_flag_is_a_usage_error():
    result = run_mesh("kv", "get", "-no-such-flag", "x")
    assert result.returncode == 2
    assert "unrecognized arguments: -no-such-flag" in result.stderr
    assert "usage: mesh kv get" in result.stderr


def test_a_bad_flag_value_is_a_usage_error_naming_the_flag():
    result = run_mesh("kv", "put", "-flags=abc", "k", "v")
    assert result.returncode == 2
    assert "argument -flags/--flags: invalid unsigned integer 'abc'" in result.stderr

    result = run_mesh("kv", "put", "-flags=-1", "k", "v")
    assert result.returncode == 2

    result = run_mesh("acl", "token", "list", "-format=xml")
    assert result.returncode == 2
    assert "invalid choice: 'xml'" in result.stderr


# --------------------------------------------------------------------------- addresses and connection errors


def test_an_unreachable_server_is_one_clear_line_and_exit_1():
    port = free_port()
    result = run_mesh("catalog", "services", f"-http-addr=127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error connecting to meshweb at http://127.0.0.1:{port}: Connection refused\n"
    )


def test_every_client_command_reports_an_unreachable_server_the_same_way(tmp_path):
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    (tmp_path / "web.json").write_text('{"service": {"name": "web"}}')
    commands = [
        ["acl", "bootstrap"],
        ["acl", "token", "create", "-policy-name=x"],
        ["acl", "token", "list"],
        ["acl", "policy", "create", "-name=x"],
        ["acl", "policy", "list"],
        ["catalog", "services"],
        ["catalog", "nodes"],
        ["catalog", "datacenters"],
        ["kv", "get", "k"],
        ["kv", "put", "k", "v"],
        ["kv", "delete", "k"],
        ["members"],
        ["services", "register", str(tmp_path / "web.json")],
        ["services", "deregister", "-id=web"],
    ]
    for command in commands:
        result = run_mesh(*command, env={"MESH_HTTP_ADDR": addr})
        assert result.returncode == 1, command
        assert result.stderr.startswith(f"Error connecting to meshweb at {addr}: "), command


def test_the_address_comes_from_the_flag_then_mesh_then_consul_environment(server):
    good, bad = server.addr, f"127.0.0.1:{free_port()}"
    # -http-addr wins over the environment, and accepts a URL.
    ok(run_mesh("catalog", "datacenters", f"-http-addr=http://{good}", env={"MESH_HTTP_ADDR": bad}))
    ok(run_mesh("catalog", "datacenters", "--http-addr", good, env={"MESH_HTTP_ADDR": bad}))
    # MESH_HTTP_ADDR wins over CONSUL_HTTP_ADDR.
    ok(run_mesh("catalog", "datacenters", env={"MESH_HTTP_ADDR": good, "CONSUL_HTTP_ADDR": bad}))
    assert (
        run_mesh(
            "catalog", "datacenters", env={"MESH_HTTP_ADDR": bad, "CONSUL_HTTP_ADDR": good}
        ).returncode
        == 1
    )
    # CONSUL_HTTP_ADDR alone is honoured, as existing consul habits expect.
    ok(run_mesh("catalog", "datacenters", env={"CONSUL_HTTP_ADDR": f"http://{good}"}))


def test_an_address_that_is_not_http_is_refused_before_connecting():
    result = run_mesh("members", "-http-addr=unix:///tmp/consul.sock")
    assert result.returncode == 1
    assert "Unsupported scheme in -http-addr 'unix:///tmp/consul.sock'" in result.stderr

    result = run_mesh("members", "-http-addr=127.0.0.1:notaport")
    assert result.returncode == 1
    assert "Invalid port in -http-addr" in result.stderr


# --------------------------------------------------------------------------- kv


def test_kv_put_then_get_prints_consuls_messages_and_the_raw_value(server, unique):
    key = unique("cli") + "/redis/maxconns"
    assert (
        ok(run_mesh("kv", "put", key, "5", server=server)) == f"Success! Data written to: {key}\n"
    )
    assert ok(run_mesh("kv", "get", key, server=server)) == "5\n"
    # A leading slash is stripped, as consul does.
    assert ok(run_mesh("kv", "get", "/" + key, server=server)) == "5\n"


def test_kv_get_of_a_missing_key_fails_with_exit_1(server, unique):
    key = unique("cli") + "/nothing"
    result = run_mesh("kv", "get", key, server=server)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Error! No key exists at: {key}\n"


def test_kv_put_reads_data_from_a_file_and_from_stdin_byte_for_byte(server, unique, tmp_path):
    key = unique("cli")
    blob = bytes(range(256))
    (tmp_path / "blob.bin").write_bytes(blob)
    ok(run_mesh("kv", "put", f"{key}/file", f"@{tmp_path / 'blob.bin'}", server=server))
    ok(run_mesh("kv", "put", f"{key}/stdin", "-", server=server, stdin=b"from stdin\n"))
    with server.client() as c:
        stored = c.get(f"/v1/kv/{key}/file").json()[0]["Value"]
    assert base64.b64decode(stored) == blob
    assert run_mesh("kv", "get", f"{key}/file", server=server).raw_stdout == blob + b"\n"
    assert ok(run_mesh("kv", "get", f"{key}/stdin", server=server)) == "from stdin\n\n"
    assert ok(run_mesh("kv", "get", "-base64", f"{key}/file", server=server)) == (
        base64.b64encode(blob).decode() + "\n"
    )


def test_kv_put_of_a_missing_file_fails_cleanly(server, unique, tmp_path):
    result = run_mesh("kv", "put", unique("cli"), f"@{tmp_path / 'nope.txt'}", server=server)
    assert result.returncode == 1
    assert result.stderr.startswith("Error! Failed to read file: ")
    assert "No such file or directory" in result.stderr


def test_kv_put_without_data_writes_an_empty_value(server, unique):
    key = unique("cli")
    ok(run_mesh("kv", "put", key, server=server))
    assert ok(run_mesh("kv", "get", key, server=server)) == "\n"


def test_kv_get_detailed_shows_the_metadata_block(server, unique):
    key = unique("cli") + "/flagged"
    ok(run_mesh("kv", "put", "-flags=42", key, "on", server=server))
    with server.client() as c:
        pair = c.get(f"/v1/kv/{key}").json()[0]
    text = ok(run_mesh("kv", "get", "-detailed", key, server=server))
    assert text == (
        f"CreateIndex      {pair['CreateIndex']}\n"
        f"Flags            42\n"
        f"Key              {key}\n"
        f"LockIndex        0\n"
        f"ModifyIndex      {pair['ModifyIndex']}\n"
        f"Session          -\n"
        f"Value            on\n"
    )


def test_kv_get_recurse_and_keys_list_a_prefix(server, unique):
    prefix = unique("cli")
    for key, value in (("a", "1"), ("b/c", "2"), ("b/d", "3")):
        ok(run_mesh("kv", "put", f"{prefix}/{key}", value, server=server))
    assert ok(run_mesh("kv", "get", "-recurse", prefix + "/", server=server)) == (
        f"{prefix}/a:1\n{prefix}/b/c:2\n{prefix}/b/d:3\n"
    )
    assert ok(run_mesh("kv", "get", "-keys", prefix + "/", server=server)) == (
        f"{prefix}/a\n{prefix}/b/\n"
    )
    assert ok(run_mesh("kv", "get", "-keys", "-separator=", prefix + "/", server=server)) == (
        f"{prefix}/a\n{prefix}/b/c\n{prefix}/b/d\n"
    )
    detailed = ok(run_mesh("kv", "get", "-recurse", "-detailed", prefix + "/b/", server=server))
    blocks = detailed.split("\n\n")
    assert len(blocks) == 2
    assert f"Key              {prefix}/b/c\n" in blocks[0]
    assert blocks[1].endswith("Value            3\n")
    # An empty prefix is not an error: nothing to print.
    assert ok(run_mesh("kv", "get", "-recurse", unique("empty"), server=server)) == ""
    assert ok(run_mesh("kv", "get", "-keys", unique("empty"), server=server)) == ""


def test_kv_put_cas_writes_only_at_the_expected_modify_index(server, unique):
    key = unique("cli")
    ok(run_mesh("kv", "put", key, "v1", server=server))
    with server.client() as c:
        index = c.get(f"/v1/kv/{key}").json()[0]["ModifyIndex"]

    result = run_mesh(
        "kv", "put", "-cas", f"-modify-index={index + 1000}", key, "v2", server=server
    )
    assert result.returncode == 1
    assert result.stderr == f"Error! Did not write to {key}: CAS failed\n"
    assert ok(run_mesh("kv", "get", key, server=server)) == "v1\n"

    assert (
        ok(run_mesh("kv", "put", "-cas", f"-modify-index={index}", key, "v2", server=server))
        == f"Success! Data written to: {key}\n"
    )
    assert ok(run_mesh("kv", "get", key, server=server)) == "v2\n"


def test_kv_argument_mistakes_get_consuls_messages(server):
    cases = [
        (["kv", "get"], "Error! Missing KEY argument"),
        (["kv", "get", "a", "b"], "Too many arguments (expected 1, got 2)"),
        (["kv", "put"], "Error! Missing KEY argument"),
        (["kv", "put", "a", "b", "c"], "Error! Too many arguments (expected 1 or 2, got 3)"),
        (["kv", "put", "-cas", "k", "v"], "Must specify -modify-index with -cas!"),
        (
            ["kv", "put", "-acquire", "k", "v"],
            "Error! Missing -session (required with -acquire and -release)",
        ),
        (["kv", "put", "-base64", "k", "not base64!"], "Error! Cannot base 64 decode data: "),
        (["kv", "delete"], "Error! Missing KEY argument"),
        (
            ["kv", "delete", "-cas", "k"],
            "Cannot delete a key that does not exist. Provide a -modify-index greater than 0.",
        ),
        (["kv", "delete", "-modify-index=3", "k"], "Cannot specify -modify-index without -cas!"),
        (
            ["kv", "delete", "-recurse", "-cas", "-modify-index=3", "k"],
            "Cannot specify both -cas and -recurse!",
        ),
    ]
    for args, message in cases:
        result = run_mesh(*args, server=server)
        assert result.returncode == 1, args
        assert result.stderr.startswith(message), (args, result.stderr)


def test_kv_delete_removes_a_key_a_prefix_and_honours_cas(server, unique):
    prefix = unique("cli")
    for key in ("a", "b", "c/d"):
        ok(run_mesh("kv", "put", f"{prefix}/{key}", "x", server=server))

    assert ok(run_mesh("kv", "delete", f"{prefix}/a", server=server)) == (
        f"Success! Deleted key: {prefix}/a\n"
    )
    assert run_mesh("kv", "get", f"{prefix}/a", server=server).returncode == 1

    with server.client() as c:
        index = c.get(f"/v1/kv/{prefix}/b").json()[0]["ModifyIndex"]
    result = run_mesh(
        "kv", "delete", "-cas", f"-modify-index={index + 1000}", f"{prefix}/b", server=server
    )
    assert result.returncode == 1
    assert result.stderr == f"Error! Did not delete key {prefix}/b: CAS failed\n"
    assert (
        ok(run_mesh("kv", "delete", "-cas", f"-modify-index={index}", f"{prefix}/b", server=server))
        == f"Success! Deleted key: {prefix}/b\n"
    )

    assert ok(run_mesh("kv", "delete", "-recurse", f"{prefix}/", server=server)) == (
        f"Success! Deleted keys with prefix: {prefix}/\n"
    )
    assert ok(run_mesh("kv", "get", "-recurse", f"{prefix}/", server=server)) == ""
    # Deleting what is not there succeeds, as in consul.
    assert ok(run_mesh("kv", "delete", f"{prefix}/never", server=server)) == (
        f"Success! Deleted key: {prefix}/never\n"
    )


def test_kv_without_a_token_on_an_acl_server_is_permission_denied(acl_server, unique):
    key = unique("cli")
    result = run_mesh("kv", "put", key, "v", server=acl_server)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error! Did not write to {key}: Unexpected response code: 403")
    assert "Permission denied" in result.stderr
    assert "no ACL token given: pass -token or set MESH_HTTP_TOKEN" in result.stderr

    result = run_mesh("kv", "get", key, server=acl_server)
    assert result.returncode == 1
    assert "Permission denied" in result.stderr

    # With the management token (by flag, or the consul variable) it works.
    ok(run_mesh("kv", "put", key, "v", f"-token={acl_server.token}", server=acl_server))
    assert (
        ok(
            run_mesh(
                "kv", "get", key, server=acl_server, env={"CONSUL_HTTP_TOKEN": acl_server.token}
            )
        )
        == "v\n"
    )


def test_a_token_file_is_read_like_consuls(acl_server, unique, tmp_path):
    (tmp_path / "token").write_text(acl_server.token + "\n")
    key = unique("cli")
    ok(run_mesh("kv", "put", key, "v", f"-token-file={tmp_path / 'token'}", server=acl_server))
    result = run_mesh("kv", "get", key, f"-token-file={tmp_path / 'missing'}", server=acl_server)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error reading token file {tmp_path / 'missing'}: ")


# --------------------------------------------------------------------------- services and catalog


def test_services_register_reads_a_json_definition(server, unique, tmp_path):
    name = unique("web")
    path = tmp_path / "web.json"
    path.write_text(
        json.dumps(
            {
                "service": {
                    "name": name,
                    "id": f"{name}-1",
                    "port": 8080,
                    "tags": ["v1", "blue"],
                    "meta": {"team": "core"},
                    "enable_tag_override": True,
                }
            }
        )
    )
    assert ok(run_mesh("services", "register", str(path), server=server)) == (
        f"Registered service: {name}\n"
    )
    with server.client() as c:
        svc = c.get(f"/v1/agent/service/{name}-1").json()
    assert (svc["Service"], svc["Port"], svc["Tags"], svc["Meta"], svc["EnableTagOverride"]) == (
        name,
        8080,
        ["v1", "blue"],
        {"team": "core"},
        True,
    )


def test_services_register_reads_yaml_with_several_services(server, unique, tmp_path):
    a, b = unique("api"), unique("db")
    path = tmp_path / "svcs.yaml"
    path.write_text(
        "services:\n"
        f"  - name: {a}\n    port: 9000\n    tags: [grpc]\n"
        f"  - Name: {b}\n    Port: 5432\n    Check:\n      TTL: 30s\n"
    )
    assert ok(run_mesh("services", "register", str(path), server=server)) == (
        f"Registered service: {a}\nRegistered service: {b}\n"
    )
    with server.client() as c:
        assert c.get(f"/v1/agent/service/{a}").json()["Port"] == 9000
        checks = c.get("/v1/agent/checks").json()
    assert [ch["ServiceName"] for ch in checks.values() if ch["ServiceID"] == b] == [b]


def test_services_register_reads_an_hcl_definition_with_a_check_block(server, unique, tmp_path):
    name = unique("hcl")
    path = tmp_path / "web.hcl"
    path.write_text(
        f'service {{\n  name = "{name}"\n  port = 80\n  tags = ["edge"]\n'
        '  meta = { version = "2" }\n'
        '  check {\n    id = "' + name + '-ttl"\n    ttl = "30s"\n  }\n}\n'
    )
    assert ok(run_mesh("services", "register", str(path), server=server)) == (
        f"Registered service: {name}\n"
    )
    with server.client() as c:
        svc = c.get(f"/v1/agent/service/{name}").json()
        checks = c.get("/v1/agent/checks").json()
    assert (svc["Port"], svc["Tags"], svc["Meta"]) == (80, ["edge"], {"version": "2"})
    assert checks[f"{name}-ttl"]["ServiceID"] == name


def test_services_register_from_flags_and_deregister_by_id(server, unique):
    name = unique("flag")
    assert ok(
        run_mesh(
            "services",
            "register",
            f"-name={name}",
            "-port=7000",
            "-tag=a",
            "-tag=b",
            "-meta=env=prod",
            server=server,
        )
    ) == (f"Registered service: {name}\n")
    with server.client() as c:
        svc = c.get(f"/v1/agent/service/{name}").json()
    assert (svc["Port"], svc["Tags"], svc["Meta"]) == (7000, ["a", "b"], {"env": "prod"})

    assert ok(run_mesh("services", "deregister", f"-id={name}", server=server)) == (
        f"Deregistered service: {name}\n"
    )
    with server.client() as c:
        assert c.get(f"/v1/agent/service/{name}").status_code == 404


def test_services_deregister_by_the_file_that_registered(server, unique, tmp_path):
    name = unique("file")
    path = tmp_path / "svc.json"
    path.write_text(json.dumps({"Name": name, "ID": f"{name}-x", "Port": 1}))
    ok(run_mesh("services", "register", str(path), server=server))
    assert ok(run_mesh("services", "deregister", str(path), server=server)) == (
        f"Deregistered service: {name}-x\n"
    )


def test_services_mistakes_are_clear_errors(server, unique, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.yaml").write_text("other: 1\n")
    (tmp_path / "noname.json").write_text('{"service": {"port": 80}}')
    (tmp_path / "latin1.json").write_bytes(b'{"service": {"name": "caf\xe9"}}')
    cases = [
        (["services", "register"], "Service registration requires at least one argument or flags."),
        (
            ["services", "register", str(tmp_path / "missing.json")],
            f"Error: Failed to read file {tmp_path / 'missing.json'}: No such file or directory",
        ),
        (
            ["services", "register", str(tmp_path / "bad.json")],
            f"Error: Failed to decode {tmp_path / 'bad.json'}: ",
        ),
        (
            ["services", "register", str(tmp_path / "latin1.json")],
            f"Error: Failed to read file {tmp_path / 'latin1.json'}: 'utf-8' codec can't decode",
        ),
        (
            ["services", "register", str(tmp_path / "empty.yaml")],
            f"Error: {tmp_path / 'empty.yaml'} does not define a service",
        ),
        (
            ["services", "register", str(tmp_path / "noname.json")],
            "Error registering service '': Unexpected response code: 400 (Missing service name)",
        ),
        (
            ["services", "deregister"],
            "Service deregistration requires at least one argument or -id.",
        ),
        (
            ["services", "deregister", f"-id={unique('ghost')}"],
            "Error deregistering service 'ghost-",
        ),
    ]
    for args, message in cases:
        result = run_mesh(*args, server=server)
        assert result.returncode == 1, args
        assert result.stderr.startswith(message), (args, result.stderr)
    result = run_mesh("services", "deregister", f"-id={unique('ghost')}", server=server)
    assert "Unexpected response code: 404 (Unknown service ID" in result.stderr


def test_services_register_without_a_token_on_an_acl_server_is_permission_denied(
    acl_server, unique
):
    name = unique("web")
    result = run_mesh("services", "register", f"-name={name}", server=acl_server)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"Error registering service '{name}': Unexpected response code: 403 (Permission denied"
    )


def test_catalog_services_lists_names_and_tags(server, unique, local_node):
    name = unique("cat")
    ok(run_mesh("services", "register", f"-name={name}", "-tag=v2", "-tag=alpha", server=server))

    names = ok(run_mesh("catalog", "services", server=server)).splitlines()
    assert name in names
    assert names == sorted(names)

    tagged = ok(run_mesh("catalog", "services", "-tags", server=server)).splitlines()
    assert re.search(rf"^{re.escape(name)} {{6,}}alpha,v2$", "\n".join(tagged), re.M)

    on_node = ok(run_mesh("catalog", "services", f"-node={local_node['Node']}", server=server))
    assert name in on_node.splitlines()

    as_json = json.loads(ok(run_mesh("catalog", "services", "-format=json", server=server)))
    assert as_json[name] == ["alpha", "v2"]
    with server.client() as c:
        assert set(as_json) == set(c.get("/v1/catalog/services").json())


def test_catalog_services_of_an_unknown_node_says_nothing_matches(server, unique):
    result = run_mesh("catalog", "services", f"-node={unique('nonode')}", server=server)
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == "No services match the given query - try expanding your search.\n"


def test_catalog_nodes_shows_consuls_table(server, unique, local_node):
    text = ok(run_mesh("catalog", "nodes", server=server))
    lines = text.splitlines()
    assert re.match(r"^Node +ID +Address +DC$", lines[0])
    short_id = local_node["ID"].split("-")[0]
    row = next(line for line in lines if line.startswith(local_node["Node"] + " "))
    assert row.split() == [
        local_node["Node"],
        short_id,
        local_node["Address"],
        local_node["Datacenter"],
    ]

    detailed = ok(run_mesh("catalog", "nodes", "-detailed", server=server)).splitlines()
    assert re.match(r"^Node +ID +Address +DC +TaggedAddresses +Meta$", detailed[0])
    assert any(local_node["ID"] in line for line in detailed[1:])

    name = unique("onnode")
    ok(run_mesh("services", "register", f"-name={name}", server=server))
    by_service = ok(run_mesh("catalog", "nodes", f"-service={name}", server=server)).splitlines()
    assert [line.split()[0] for line in by_service[1:]] == [local_node["Node"]]

    as_json = json.loads(ok(run_mesh("catalog", "nodes", "-format=json", server=server)))
    assert local_node["Node"] in [n["Node"] for n in as_json]


def test_catalog_nodes_for_a_service_nobody_provides(server, unique):
    result = run_mesh("catalog", "nodes", f"-service={unique('none')}", server=server)
    assert result.returncode == 0
    assert result.stderr == "No nodes match the given query - try expanding your search.\n"


def test_catalog_nodes_passes_a_bad_filter_on_as_the_servers_400(server):
    result = run_mesh("catalog", "nodes", "-filter=Node ==", server=server)
    assert result.returncode == 1
    assert result.stderr.startswith("Error listing nodes: Unexpected response code: 400")


def test_catalog_node_meta_must_be_key_equals_value(server):
    result = run_mesh("catalog", "services", "-node-meta=rack", server=server)
    assert result.returncode == 2
    assert "expected key=value, got 'rack'" in result.stderr


def test_catalog_datacenters_lists_the_servers_datacenters(server):
    with server.client() as c:
        dcs = c.get("/v1/catalog/datacenters").json()
    assert ok(run_mesh("catalog", "datacenters", server=server)) == "".join(f"{d}\n" for d in dcs)
    assert json.loads(ok(run_mesh("catalog", "datacenters", "-format=json", server=server))) == dcs


def test_the_datacenter_option_is_sent_to_the_server(server, local_node):
    dc = local_node["Datacenter"]
    assert local_node["Node"] in ok(
        run_mesh("catalog", "nodes", f"-datacenter={dc}", server=server)
    )
    result = run_mesh("catalog", "services", "-datacenter=nowhere", server=server)
    assert result.returncode == 1
    assert result.stderr == (
        'Error listing services: Unexpected response code: 404 (No path to datacenter "nowhere")\n'
    )


def test_catalog_commands_refuse_stray_arguments(server):
    result = run_mesh("catalog", "services", "extra", server=server)
    assert result.returncode == 1
    assert result.stderr == "Too many arguments (expected 0, got 1)\n"


def test_members_prints_consuls_columns_for_the_server(server, local_node):
    with server.client() as c:
        member = c.get("/v1/agent/members").json()[0]
    text = ok(run_mesh("members", server=server))
    lines = text.splitlines()
    assert lines[0].split() == [
        "Node",
        "Address",
        "Status",
        "Type",
        "Build",
        "Protocol",
        "DC",
        "Partition",
        "Segment",
    ]
    row = next(line for line in lines[1:] if line.startswith(local_node["Node"] + " "))
    assert row.split() == [
        local_node["Node"],
        f"{member['Addr']}:{member['Port']}",
        "alive",
        "server",
        member["Tags"]["build"].split(":")[0],
        str(member["ProtocolCur"]),
        local_node["Datacenter"],
        "default",
        "<all>",
    ]
    # Columns line up: every row's Status starts where the header's does.
    col = lines[0].index("Status")
    assert all(line[col:].startswith(("alive", "left", "failed", "leaving")) for line in lines[1:])

    detailed = ok(run_mesh("members", "-detailed", server=server))
    assert "role=consul" in detailed and f"dc={local_node['Datacenter']}" in detailed


def test_members_exits_2_when_no_member_matches_the_status(server):
    result = run_mesh("members", "-status=^failed$", server=server)
    assert (result.returncode, result.stdout) == (2, "")
    result = run_mesh("members", "-status=(", server=server)
    assert result.returncode == 1
    assert result.stderr.startswith("Failed to compile status regexp: ")


def test_members_without_a_token_on_an_acl_server_lists_nothing(acl_server, local_node):
    # Anonymous may not read nodes under default-deny: consul filters, the list is empty.
    result = run_mesh("members", server=acl_server)
    assert (result.returncode, result.stdout) == (2, "")
    ok(run_mesh("members", f"-token={acl_server.token}", server=acl_server))


# --------------------------------------------------------------------------- acl


@pytest.fixture(scope="module")
def fresh_acl_server(tmp_path_factory):
    """ACLs on and not yet bootstrapped: `mesh acl bootstrap` has work to do."""
    srv = make_server(
        tmp_path_factory.mktemp("cli-bootstrap"),
        acl=True,
        extra_env={"MESH_ACL_INITIAL_MANAGEMENT_TOKEN": "", "MESH_ACL_BOOTSTRAP_ON_START": "false"},
    )
    yield srv
    srv.close()


TOKEN_BLOCK = re.compile(
    r"^AccessorID:       (?P<accessor>[0-9a-f-]{36})\n"
    r"SecretID:         (?P<secret>[0-9a-f-]{36})\n"
    r"Description:      (?P<description>.*)\n"
    r"Local:            (?P<local>true|false)\n"
    r"Create Time:      (?P<created>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC)\n"
    r"(?P<rest>(.*\n)*)$"
)


def test_acl_bootstrap_prints_the_management_token_once(fresh_acl_server):
    text = ok(run_mesh("acl", "bootstrap", server=fresh_acl_server))
    m = TOKEN_BLOCK.match(text)
    assert m, text
    assert m["description"] == "Bootstrap Token (Global Management)"
    assert m["rest"] == ("Policies:\n   00000000-0000-0000-0000-000000000001 - global-management\n")
    # The secret works as a management token.
    ok(run_mesh("acl", "token", "list", f"-token={m['secret']}", server=fresh_acl_server))

    again = run_mesh("acl", "bootstrap", server=fresh_acl_server)
    assert again.returncode == 1
    assert again.stderr.startswith("Failed ACL bootstrapping: Unexpected response code: 403")
    assert "ACL bootstrap no longer allowed" in again.stderr


def test_acl_bootstrap_as_json_on_a_bootstrapped_server_fails_cleanly(acl_server):
    result = run_mesh("acl", "bootstrap", "-format=json", server=acl_server)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "ACL bootstrap no longer allowed" in result.stderr


def test_acl_policy_create_from_a_file_and_list(acl_server, unique, tmp_path):
    name = unique("kv-writer")
    prefix = unique("team")
    rules = f'key_prefix "{prefix}/" {{\n  policy = "write"\n}}\n'
    (tmp_path / "rules.hcl").write_text(rules)
    text = ok(
        run_mesh(
            "acl",
            "policy",
            "create",
            f"-name={name}",
            "-description=team keys",
            f"-rules=@{tmp_path / 'rules.hcl'}",
            token=acl_server.token,
            server=acl_server,
        )
    )
    m = re.match(
        r"^ID:           (?P<id>[0-9a-f-]{36})\n"
        rf"Name:         {re.escape(name)}\n"
        r"Description:  team keys\n"
        r"Datacenters:  \n"
        r"Rules:\n(?P<rules>(.*\n?)*)$",
        text,
    )
    assert m, text
    assert m["rules"].strip() == rules.strip()
    with acl_server.client() as c:
        stored = c.get(f"/v1/acl/policy/{m['id']}").json()
    assert (stored["Name"], stored["Description"]) == (name, "team keys")

    listing = ok(run_mesh("acl", "policy", "list", token=acl_server.token, server=acl_server))
    assert (
        f"{name}:\n   ID:           {m['id']}\n   Description:  team keys\n   Datacenters:  \n"
    ) in listing
    assert "global-management:\n   ID:           00000000-0000-0000-0000-000000000001\n" in listing

    as_json = json.loads(
        ok(
            run_mesh(
                "acl", "policy", "list", "-format=json", token=acl_server.token, server=acl_server
            )
        )
    )
    assert m["id"] in [p["ID"] for p in as_json]


def test_acl_policy_create_reads_rules_from_stdin(acl_server, unique):
    name = unique("stdin-policy")
    text = ok(
        run_mesh(
            "acl",
            "policy",
            "create",
            f"-name={name}",
            "-rules=-",
            "-format=json",
            token=acl_server.token,
            server=acl_server,
            stdin=b'node_prefix "" { policy = "read" }\n',
        )
    )
    policy = json.loads(text)
    assert policy["Name"] == name
    assert 'node_prefix ""' in policy["Rules"]


def test_acl_policy_create_mistakes(acl_server, unique, tmp_path):
    result = run_mesh(
        "acl", "policy", "create", "-rules=x", token=acl_server.token, server=acl_server
    )
    assert (result.returncode, result.stderr) == (1, "Missing required '-name' flag\n")

    result = run_mesh(
        "acl",
        "policy",
        "create",
        f"-name={unique('p')}",
        f"-rules=@{tmp_path / 'missing.hcl'}",
        token=acl_server.token,
        server=acl_server,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error loading rules: Failed to read file: ")

    (tmp_path / "latin1.hcl").write_bytes(b'key_prefix "caf\xe9" { policy = "read" }')
    result = run_mesh(
        "acl",
        "policy",
        "create",
        f"-name={unique('p')}",
        f"-rules=@{tmp_path / 'latin1.hcl'}",
        token=acl_server.token,
        server=acl_server,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error loading rules: Failed to read file: 'utf-8' codec")

    result = run_mesh(
        "acl",
        "policy",
        "create",
        f"-name={unique('p')}",
        '-rules=key_prefix "" { policy = "sideways" }',
        token=acl_server.token,
        server=acl_server,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Failed to create new policy: Unexpected response code: 400")


def test_acl_token_create_links_policies_and_the_token_works(acl_server, unique):
    prefix = unique("app")
    policy_name = unique("app-kv")
    ok(
        run_mesh(
            "acl",
            "policy",
            "create",
            f"-name={policy_name}",
            f'-rules=key_prefix "{prefix}/" {{ policy = "write" }}',
            token=acl_server.token,
            server=acl_server,
        )
    )

    text = ok(
        run_mesh(
            "acl",
            "token",
            "create",
            "-description=app token",
            f"-policy-name={policy_name}",
            token=acl_server.token,
            server=acl_server,
        )
    )
    m = TOKEN_BLOCK.match(text)
    assert m, text
    assert (m["description"], m["local"]) == ("app token", "false")
    policy_line = re.fullmatch(r"Policies:\n   ([0-9a-f-]{36}) - (.+)\n", m["rest"])
    assert policy_line and policy_line[2] == policy_name

    # The new secret may write under its prefix and nowhere else.
    ok(run_mesh("kv", "put", f"{prefix}/k", "v", f"-token={m['secret']}", server=acl_server))
    denied = run_mesh(
        "kv", "put", f"{unique('elsewhere')}/k", "v", f"-token={m['secret']}", server=acl_server
    )
    assert denied.returncode == 1
    assert "Unexpected response code: 403 (Permission denied" in denied.stderr
    assert "no ACL token given" not in denied.stderr

    # -policy-id takes a unique prefix of the ID, as consul's does.
    by_id = json.loads(
        ok(
            run_mesh(
                "acl",
                "token",
                "create",
                f"-policy-id={policy_line[1][:8]}",
                "-format=json",
                token=acl_server.token,
                server=acl_server,
            )
        )
    )
    assert [p["Name"] for p in by_id["Policies"]] == [policy_name]

    listing = ok(run_mesh("acl", "token", "list", token=acl_server.token, server=acl_server))
    blocks = listing.split("\n\n")
    mine = [b for b in blocks if b.startswith(f"AccessorID:       {m['accessor']}\n")]
    assert len(mine) == 1
    assert f"   {policy_line[1]} - {policy_name}" in mine[0]

    as_json = json.loads(
        ok(
            run_mesh(
                "acl", "token", "list", "-format=json", token=acl_server.token, server=acl_server
            )
        )
    )
    assert m["accessor"] in [t["AccessorID"] for t in as_json]


def test_acl_token_create_with_an_unknown_policy_fails(acl_server, unique):
    result = run_mesh(
        "acl",
        "token",
        "create",
        f"-policy-name={unique('nope')}",
        token=acl_server.token,
        server=acl_server,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Failed to create new token: Unexpected response code: 400")


def test_acl_commands_without_a_token_are_permission_denied(acl_server):
    for args, prefix in (
        (["acl", "token", "list"], "Failed to retrieve the token list: "),
        (["acl", "policy", "list"], "Failed to retrieve the policy list: "),
        (["acl", "policy", "create", "-name=x"], "Failed to create new policy: "),
        (["acl", "token", "create", "-policy-name=x"], "Failed to create new token: "),
    ):
        result = run_mesh(*args, server=acl_server)
        assert result.returncode == 1, args
        assert result.stdout == ""
        assert result.stderr.startswith(prefix + "Unexpected response code: 403 (Permission denied")
        assert "no ACL token given" in result.stderr

    result = run_mesh("acl", "token", "list", "-token=not-a-real-secret", server=acl_server)
    assert result.returncode == 1
    assert "403" in result.stderr


def test_an_empty_read_because_of_acls_without_a_token_says_so(acl_server, unique):
    name = unique("hidden")
    with acl_server.client() as c:
        assert c.put("/v1/agent/service/register", json={"Name": name}).status_code == 200
    with acl_server.client(token="") as anonymous:
        r = anonymous.get("/v1/catalog/services")
    assert r.status_code == 200 and name not in r.json()
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"

    result = run_mesh("catalog", "services", server=acl_server)
    assert result.returncode == 1
    assert result.stderr == (
        "No services visible: ACLs are enabled and no token was given "
        "(set MESH_HTTP_TOKEN or -token)\n"
    )
    result = run_mesh("catalog", "nodes", server=acl_server)
    assert result.returncode == 1
    assert result.stderr.startswith("No nodes visible: ACLs are enabled and no token was given")
    # With the token everything is there, and no header says anything was left out.
    listed = ok(run_mesh("catalog", "services", f"-token={acl_server.token}", server=acl_server))
    assert name in listed.split()
    with acl_server.client() as c:
        assert "X-Consul-Results-Filtered-By-ACLs" not in c.get("/v1/catalog/services").headers


def test_a_read_without_acls_never_says_results_were_filtered(server):
    with server.client() as c:
        assert "X-Consul-Results-Filtered-By-ACLs" not in c.get("/v1/catalog/services").headers


def test_acl_role_create_and_list_and_a_token_holding_the_role(acl_server, unique):
    web, api, name = unique("web"), unique("api"), unique("deployers")
    text = ok(
        run_mesh(
            "acl",
            "role",
            "create",
            f"-name={name}",
            "-description=web deployers",
            f"-service-identity={web}",
            "-node-identity=host-1:dc1",
            token=acl_server.token,
            server=acl_server,
        )
    )
    assert f"Name:         {name}" in text and "Description:  web deployers" in text
    assert f"Service Identities:\n   {web} (Datacenters: all)" in text
    assert "Node Identities:\n   host-1 (Datacenter: dc1)" in text
    listed = json.loads(
        ok(
            run_mesh(
                "acl", "role", "list", "-format=json", token=acl_server.token, server=acl_server
            )
        )
    )
    assert name in {r["Name"] for r in listed}
    assert f"{name}:\n   ID:" in ok(
        run_mesh("acl", "role", "list", token=acl_server.token, server=acl_server)
    )
    token = json.loads(
        ok(
            run_mesh(
                "acl",
                "token",
                "create",
                f"-role-name={name}",
                "-format=json",
                token=acl_server.token,
                server=acl_server,
            )
        )
    )
    assert [r["Name"] for r in token["Roles"]] == [name]
    c = acl_server.consul(token=token["SecretID"])
    assert c.agent.service.register(web, port=80) is True
    with pytest.raises(consul.ACLPermissionDenied):
        c.agent.service.register(api, port=80)
    missing = run_mesh("acl", "role", "create", token=acl_server.token, server=acl_server)
    assert missing.returncode == 1 and "Missing required '-name' flag" in missing.stderr
    bad = run_mesh(
        "acl",
        "role",
        "create",
        f"-name={unique('bad')}",
        "-service-identity=Not_Valid!",
        token=acl_server.token,
        server=acl_server,
    )
    assert bad.returncode == 1 and "invalid name" in bad.stderr
