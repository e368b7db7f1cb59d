"""deploy/: the Dockerfile, the Compose file, the Kubernetes manifests and production.env.

What the control plane reads is taken from `meshweb/settings.py` itself (its
`env_*` / `os.environ` calls, parsed), never from a list kept here: every
variable the deploy files set must be one meshweb reads, hold a value its
reader accepts, and the ones production needs must be there. Commands are
parsed by `mesh`'s own argument parser, probes must be paths `meshweb.health`
answers, ports must be the ones the settings listen on.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml
from django.core.exceptions import ImproperlyConfigured

from meshweb import env as env_readers
from meshweb import health

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
READERS = ("env_str", "env_bool", "env_int", "env_choice", "env_addr")
# What a production control plane cannot run without (shared state, shared secrets,
# reachable listeners); the test checks each deploy file sets them.
REQUIRED = {
    "DATABASE_URL",
    "REDIS_URL",
    "MESH_SECRET_KEY",
    "MESH_ENCRYPTION_KEY",
    "MESH_HTTP_ADDR",
    "MESH_GRPC_ADDR",
    "MESH_TASKS",
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


# --------------------------------------------------------------------------- what settings.py reads


def settings_reads() -> dict[str, list[tuple[str, list, dict]]]:
    """Each variable settings.py reads -> [(reader, extra args, keywords)], from its AST."""
    tree = ast.parse((ROOT / "meshweb/settings.py").read_text())
    reads: dict[str, list[tuple[str, list, dict]]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first = node.args[0]
        if not isinstance(first, ast.Constant) or not isinstance(first.value, str):
            continue
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id in READERS:
            args = [_literal(a) for a in node.args[1:]]
            kwargs = {k.arg: _literal(k.value) for k in node.keywords}
            reads.setdefault(first.value, []).append((fn.id, args, kwargs))
        elif (
            isinstance(fn, ast.Attribute)
            and fn.attr == "get"
            and isinstance(fn.value, ast.Attribute)
            and fn.value.attr == "environ"
        ):
            reads.setdefault(first.value, []).append(("environ", [], {}))
    return reads


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None  # a computed default: not needed to check a value


READS = settings_reads()


def check_value(name: str, value: str) -> None:
    """Raise AssertionError unless meshweb reads `name` and accepts `value` for it."""
    if name.endswith("_FILE") and name.removesuffix("_FILE") in READS:
        return  # NAME_FILE: meshweb.env reads NAME from that file
    assert name in READS, f"{name} is not a variable meshweb/settings.py reads"
    readers = READS[name]
    if value == "" and any(r == "env_str" for r, _a, _k in readers):
        return  # "" is how a listener is turned off (MESH_DNS_ADDR=)
    with mock.patch.dict(os.environ, {name: value}):
        for reader, args, kwargs in readers:
            if reader in ("env_str", "environ"):
                continue
            fn = getattr(env_readers, reader)
            defaults = [a if a is not None else "" for a in args]
            try:
                fn(name, *defaults, **{k: v for k, v in kwargs.items() if v is not None})
            except ImproperlyConfigured as exc:
                raise AssertionError(f"{name}={value!r}: {exc}") from None


def check_env(env: dict[str, str], where: str) -> None:
    missing = REQUIRED - set(env)
    assert not missing, f"{where} lacks {sorted(missing)}"
    for name, value in env.items():
        check_value(name, _default_of(value))
    assert urlsplit(_default_of(env["DATABASE_URL"])).scheme in ("postgres", "postgresql")
    assert urlsplit(_default_of(env["REDIS_URL"])).scheme in ("redis", "rediss")
    assert env["MESH_TASKS"] == "celery"
    for addr in ("MESH_HTTP_ADDR", "MESH_GRPC_ADDR"):
        assert env[addr].startswith("0.0.0.0:"), f"{where}: {addr} must listen beyond loopback"


def _default_of(value: str) -> str:
    """A Compose value with `${X:-default}` / `${X:?msg}` in it, as a sample value."""
    value = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))
    return re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "sample", value)


def port_of(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def mesh_command(argv: list[str]) -> str:
    """The function `mesh ARGV` runs (the real parser decides)."""
    from meshweb.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func.__name__


def test_the_settings_reads_are_found():
    assert {"DATABASE_URL", "REDIS_URL", "MESH_SECRET_KEY", "MESH_LOG_LEVEL"} <= set(READS)
    assert READS["MESH_ACL_DEFAULT_POLICY"][0][0] == "env_choice"
    assert len(READS) > 30
    with pytest.raises(AssertionError, match="not a variable"):
        check_value("MESH_GRPC_ADRR", "0.0.0.0:8502")
    with pytest.raises(AssertionError, match="not host:port"):
        check_value("MESH_GRPC_ADDR", "0.0.0.0")
    with pytest.raises(AssertionError, match="must be one of"):
        check_value("MESH_TASKS", "threads")


# --------------------------------------------------------------------------- production.env


def _env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(variables set, variables only shown commented out)."""
    values, commented = {}, set()
    for line in path.read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if not m:
            continue
        if m.group(1):
            commented.add(m.group(2))
        else:
            values[m.group(2)] = m.group(3)
    return values, commented


def test_production_env_lists_every_setting_and_sets_valid_values():
    values, commented = _env_file(DEPLOY / "production.env")
    listed = set(values) | commented
    assert listed >= set(READS), f"not in production.env: {sorted(set(READS) - listed)}"
    assert listed <= set(READS), f"not read by meshweb: {sorted(listed - set(READS))}"
    check_env(values, "production.env")
    assert values["MESH_ACL_ENABLED"] == "true"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_dockerfile_builds_every_package_and_runs_mesh_server():
    import json

    lines = _dockerfile()
    final = lines[max(i for i, (w, _r) in enumerate(lines) if w == "FROM") :]
    copied = {r.split()[0] for w, r in lines if w == "COPY" and not r.startswith("--from")}
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"the image misses {sorted(packages - copied)}"
    entry = json.loads(next(r for w, r in final if w == "ENTRYPOINT"))
    cmd = json.loads(next(r for w, r in final if w == "CMD"))
    assert entry == ["mesh"] and mesh_command(cmd) == "cmd_server"
    env = dict(re.findall(r"([A-Z_]+)=(\S+)", " ".join(r for w, r in final if w == "ENV")))
    for name, value in env.items():
        if name.startswith("MESH_"):
            check_value(name, value)
    exposed = " ".join(r for w, r in final if w == "EXPOSE").split()
    assert f"{port_of(env['MESH_HTTP_ADDR'])}/tcp" in exposed
    assert f"{port_of(env['MESH_GRPC_ADDR'])}/tcp" in exposed
    assert f"{port_of(env['MESH_DNS_ADDR'])}/udp" in exposed
    assert any(w == "USER" and not r.startswith("0") for w, r in final), "runs as root"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{p}/" in ignore for p in packages)


# --------------------------------------------------------------------------- Compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


MESH_SERVICES = {"server": "cmd_server", "worker": "cmd_worker", "beat": "cmd_beat"}


def test_compose_runs_servers_workers_and_beat_from_the_image_on_postgres_and_redis(compose):
    services = compose["services"]
    assert set(services) >= {"postgres", "redis", "lb", *MESH_SERVICES}
    for name, func in MESH_SERVICES.items():
        svc = services[name]
        assert _default_of(svc["image"]) == f"meshweb:{VERSION}"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        )
        assert mesh_command(svc["command"]) == func
        env = svc["environment"]
        check_env(env, f"compose service {name}")
        # The URLs name the Compose services that provide them.
        assert urlsplit(_default_of(env["DATABASE_URL"])).hostname in services
        assert urlsplit(_default_of(env["REDIS_URL"])).hostname in services
        assert "MESH_ACL_INITIAL_MANAGEMENT_TOKEN" in env
    server = services["server"]
    assert int(_default_of(server["deploy"]["replicas"])) >= 2
    assert all(
        server["depends_on"][d]["condition"] == "service_healthy" for d in ("postgres", "redis")
    )
    assert services["worker"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    # Healthchecks: the server's readiness endpoint on its HTTP port.
    probe = " ".join(server["healthcheck"]["test"])
    port = port_of(server["environment"]["MESH_HTTP_ADDR"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", probe)
    assert m and int(m.group(1)) == port and m.group(2) in health.PATHS
    assert {str(p) for p in server["expose"]} == {
        str(port),
        str(port_of(server["environment"]["MESH_GRPC_ADDR"])),
    }
    for infra in ("postgres", "redis"):
        assert services[infra]["healthcheck"]["test"]
    pg = services["postgres"]["environment"]
    db = urlsplit(_default_of(server["environment"]["DATABASE_URL"]))
    assert (db.username, db.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_DB"])


def test_the_load_balancer_reaches_the_servers_on_their_ports_and_checks_readiness(compose):
    cfg = (DEPLOY / "haproxy.cfg").read_text()
    env = compose["services"]["server"]["environment"]
    http, grpc = port_of(env["MESH_HTTP_ADDR"]), port_of(env["MESH_GRPC_ADDR"])
    templates = re.findall(r"server-template \S+ \d+ (\w+):(\d+) check(?: port (\d+))?", cfg)
    assert ("server", str(http), "") in templates
    assert ("server", str(grpc), str(http)) in templates  # gRPC drained by HTTP readiness
    assert set(re.findall(r"option httpchk GET (\S+)", cfg)) == {"/healthz"}
    assert "/healthz" in health.PATHS
    lb = compose["services"]["lb"]
    assert {p.split(":")[1] for p in lb["ports"]} == {str(http), str(grpc)}
    assert any("haproxy.cfg" in v for v in lb["volumes"])


def test_haproxy_accepts_the_load_balancer_config(tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed here")
    out = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Configuration file is valid" in out.stdout + out.stderr


def _docker_compose() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        probe = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return argv
    return None


def test_docker_compose_config_accepts_the_file_and_demands_the_secrets(tmp_path):
    argv = _docker_compose()
    if argv is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here")
    base = [*argv, "--project-directory", str(DEPLOY), "-f", str(DEPLOY / "compose.yaml")]
    env_file = tmp_path / "test.env"
    secrets = {
        "POSTGRES_PASSWORD": "pw",
        "MESH_SECRET_KEY": "k" * 50,
        "MESH_ENCRYPTION_KEY": "f" * 44,
        "MESH_ACL_INITIAL_MANAGEMENT_TOKEN": "6f1e1f1c-3f0a-4d5e-9c1b-2a7d3e4f5a6b",
    }
    env_file.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    clean = {k: v for k, v in os.environ.items() if k not in secrets and not k.startswith("MESH_")}
    ok = subprocess.run(
        [*base, "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    rendered = yaml.safe_load(ok.stdout)
    assert rendered["services"]["server"]["environment"]["DATABASE_URL"] == (
        "postgres://meshweb:pw@postgres:5432/meshweb"
    )
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = subprocess.run(
        [*base, "--env-file", str(empty), "config"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
    )
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def kube() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes/kustomization.yaml").read_text())
    docs: dict[tuple[str, str], dict] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / resource).read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    docs[("Kustomization", "")] = kustomization
    return docs


def _pod_env(kube, container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(kube[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            env.update(kube[("Secret", source["secretRef"]["name"])]["stringData"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


KUBE_DEPLOYMENTS = {
    "meshweb-server": "cmd_server",
    "meshweb-worker": "cmd_worker",
    "meshweb-beat": "cmd_beat",
}


def test_kubernetes_deployments_run_the_image_with_valid_commands_and_settings(kube):
    images = {i["name"]: i for i in kube[("Kustomization", "")]["images"]}
    assert images["meshweb"]["newTag"] == VERSION
    for name, func in KUBE_DEPLOYMENTS.items():
        dep = kube[("Deployment", name)]
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "meshweb"
        assert mesh_command(container["args"]) == func
        check_env(_pod_env(kube, container), f"Deployment {name}")
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    beat = kube[("Deployment", "meshweb-beat")]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert kube[("Deployment", "meshweb-server")]["spec"]["replicas"] >= 2


def test_kubernetes_servers_have_probes_ports_and_services_that_match_the_settings(kube):
    dep = kube[("Deployment", "meshweb-server")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = _pod_env(kube, container)
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports["http"] == (port_of(env["MESH_HTTP_ADDR"]), "TCP")
    assert ports["grpc"] == (port_of(env["MESH_GRPC_ADDR"]), "TCP")
    assert ports["dns-udp"] == (port_of(env["MESH_DNS_ADDR"]), "UDP")
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/healthz", "http")
    assert (live["path"], live["port"]) == ("/livez", "http")
    assert container["startupProbe"]["httpGet"]["path"] in health.PATHS
    assert set(health.PATHS) == {"/healthz", "/livez"}
    # The readiness probe must outlast a slow database check.
    assert container["readinessProbe"]["timeoutSeconds"] > health.CHECK_TIMEOUT_SECONDS
    labels = dep["spec"]["template"]["metadata"]["labels"]
    services = [d for (kind, _n), d in kube.items() if kind == "Service"]
    assert {s["metadata"]["name"] for s in services} == {
        "meshweb-http",
        "meshweb-agents",
        "meshweb-dns",
    }
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports
            assert port["port"] == ports[port["targetPort"]][0]
            assert port["protocol"] == ports[port["targetPort"]][1]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["MESH_DATA_DIR"] in mounts  # writable with a read-only root filesystem


def test_kustomize_renders_every_resource_into_the_namespace(kube):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here")
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "kubernetes")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == {
        k for k in kube if k[0] != "Kustomization"
    }
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "meshweb", doc["metadata"]
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert c["image"] == f"meshweb:{VERSION}"
