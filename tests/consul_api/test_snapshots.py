"""Snapshots: save on SQLite, restore on PostgreSQL, every table compared; refusals
leave the target untouched; `mesh snapshot save|inspect|restore` end to end."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile

import consul
import consul.exceptions
import pytest

from meshproto import snapshot as archive
from tests.support.servers import ROOT, make_server, postgres_url, require

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A server on SQLite whatever DATABASE_URL says, with ACLs on."""
    d = tmp_path_factory.mktemp("sqlite")
    srv = make_server(d, acl=True, database_url=f"sqlite:///{d / 'mesh.sqlite3'}")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A server on its own PostgreSQL database, with ACLs on."""
    require(postgres_url(), "PostgreSQL")
    srv = make_server(tmp_path_factory.mktemp("pg"), acl=True)
    assert srv.database_url and srv.database_url.startswith("postgres")
    yield srv
    srv.close()


def _populate(srv) -> dict:
    """A bit of every kind of state, made through the API."""
    c = srv.consul()
    c.catalog.register("snap-node", "10.0.0.9", service={"Service": "snap-web", "Port": 80})
    c.kv.put("snap/bin", bytes(range(256)))
    c.kv.put("snap/text", "hello", flags=42)
    session = c.session.create(name="snap-lock", ttl=3600)
    assert c.kv.put("snap/lock", "held", acquire=session)
    with srv.client() as http:
        policy = http.put(
            "/v1/acl/policy",
            json={"Name": "snap-readers", "Rules": 'key_prefix "snap/" { policy = "read" }'},
        ).json()
        token = http.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()
        r = http.put(
            "/v1/connect/intentions/exact",
            params={"source": "snap-web", "destination": "snap-db"},
            json={"Action": "allow"},
        )
        assert r.status_code == 200, r.text
        r = http.put(
            "/v1/config", json={"Kind": "service-defaults", "Name": "snap-web", "Protocol": "http"}
        )
        assert r.status_code == 200, r.text
        roots = http.get("/v1/connect/ca/roots").json()
        assert http.put("/v1/event/fire/snap-deploy", content=b"v9").status_code == 200
    return {"session": session, "token": token["SecretID"], "roots": roots}


def _state(data: bytes) -> dict:
    return archive.unpack(data).state


# Tables whose rows a restore itself changes: the index it takes and the audit entry it adds.
_CHANGED_BY_RESTORE = {"registry_meshindex", "registry_topicindex", "registry_auditentry"}
# Tables the live target may add rows to right after the restore: under the restored CA
# the server issues itself a new certificate for its agent protocol.
_GROWN_BY_THE_TARGET = {"registry_issuedcert"}


def _rows(table: dict) -> list[str]:
    """A table's rows comparable across databases (JSON objects' key order aside)."""
    return sorted(json.dumps(r, sort_keys=True) for r in table["rows"])


def test_round_trip_sqlite_to_postgresql_keeps_every_table(source, target):
    made = _populate(source)
    saved = source.consul().snapshot.save()
    snap = archive.unpack(saved)
    assert snap.meta["Version"] == archive.VERSION and snap.meta["Audit"] is True
    assert snap.state["registry_kventry"]["rows"], "the KV table is in the archive"

    # every registry table of the target database is in the archive
    import psycopg

    with psycopg.connect(target.database_url) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_name LIKE 'registry\\_%'"
            )
        }
    # (but the table of running server processes, which describes processes, not state)
    assert tables - {"registry_serverprocess"} == set(snap.state), tables ^ set(snap.state)

    before = target.client().get("/v1/kv/snap/text")
    assert before.status_code == 404
    assert target.consul().snapshot.restore(saved) is True

    again = _state(target.consul().snapshot.save())
    for table, data in snap.state.items():
        got = again[table]
        assert got["columns"] == data["columns"], table
        if table in _CHANGED_BY_RESTORE:
            continue
        if table in _GROWN_BY_THE_TARGET:
            assert set(_rows(data)) <= set(_rows(got)), table  # every saved row is there
            continue
        assert _rows(got) == _rows(data), table
    audit = again["registry_auditentry"]
    assert len(audit["rows"]) == len(snap.state["registry_auditentry"]["rows"]) + 1  # + the restore

    # and the restored state works through the API on PostgreSQL
    c = target.consul()
    assert c.kv.get("snap/bin")[1]["Value"] == bytes(range(256))
    _, lock = c.kv.get("snap/lock")
    assert lock["Session"] == made["session"] and lock["LockIndex"] == 1
    assert c.kv.get("snap/text")[1]["Flags"] == 42
    assert [s["ServiceName"] for s in c.catalog.service("snap-web")[1]] == ["snap-web"]
    reader = consul.Consul(port=target.http_port, token=made["token"])
    assert reader.kv.get("snap/text")[1]["Value"] == b"hello"  # the restored token and policy
    with pytest.raises(consul.exceptions.ACLPermissionDenied):
        reader.kv.put("snap/text", "no")
    with target.client() as http:
        roots = http.get("/v1/connect/ca/roots").json()
        assert [r["RootCert"] for r in roots["Roots"]] == [
            r["RootCert"] for r in made["roots"]["Roots"]
        ]
        # the restored CA (its key decrypted with the shared secret) still signs leaves
        leaf = http.get("/v1/agent/connect/ca/leaf/snap-web")
        assert leaf.status_code == 200, leaf.text
        from cryptography import x509

        active = next(r for r in roots["Roots"] if r["Active"])
        cert = x509.load_pem_x509_certificate(leaf.json()["CertPEM"].encode())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(active["RootCert"].encode()))
        assert made["roots"]["TrustDomain"] in leaf.json()["ServiceURI"]
        ixn = http.get(
            "/v1/connect/intentions/exact", params={"source": "snap-web", "destination": "snap-db"}
        )
        assert ixn.json()["Action"] == "allow"
        assert http.get("/v1/config/service-defaults/snap-web").json()["Protocol"] == "http"
        assert [e["Name"] for e in http.get("/v1/event/list").json()] == ["snap-deploy"]
        # indexes never go backwards: the restore took one above both sides'
        assert int(http.get("/v1/kv/snap/text").headers["X-Consul-Index"]) > snap.meta["Index"]


def _repack(data: bytes, change) -> bytes:
    """The archive with its members edited by `change(files)` (checksums left as they were)."""
    files = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        for info in tar:
            files[info.name] = tar.extractfile(info).read()
    change(files)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _with_sums(files: dict) -> None:
    files["SHA256SUMS"] = "".join(
        f"{archive._sha256(files[n])}  {n}\n" for n in archive.MEMBERS
    ).encode()


def test_bad_snapshots_are_refused_and_nothing_changes(source):
    c = source.consul()
    c.kv.put("refuse/probe", "before")
    good = c.snapshot.save()
    c.kv.put("refuse/probe", "after")

    def meta_edit(**fields):
        def change(files):
            meta = json.loads(files["meta.json"])
            meta.update(fields)
            files["meta.json"] = json.dumps(meta).encode()
            _with_sums(files)

        return change

    def corrupt(files):
        files["state.json"] = files["state.json"].replace(b'"before"', b'"BEFORE"', 1) + b" "

    bad = {
        "truncated": good[: len(good) // 2],
        "not an archive": b"hello, not a snapshot",
        "checksum": _repack(good, corrupt),
        "newer version": _repack(good, meta_edit(Version=archive.VERSION + 1)),
        "newer schema": _repack(good, meta_edit(Migrations=["9999_from_the_future"])),
    }
    with source.client() as http:
        for what, body in bad.items():
            r = http.put("/v1/snapshot", content=body)
            assert r.status_code == 400, (what, r.text)
            assert r.text.startswith("snapshot refused"), (what, r.text)
        assert http.put("/v1/snapshot", content=b"").status_code == 400
    assert "newer" in source.client().put("/v1/snapshot", content=bad["newer version"]).text
    assert c.kv.get("refuse/probe")[1]["Value"] == b"after"  # untouched
    # a non-management token may neither save nor restore
    with source.client() as http:
        policy = http.put(
            "/v1/acl/policy", json={"Name": "snap-op", "Rules": 'operator = "write"'}
        ).json()
        token = http.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()[
            "SecretID"
        ]
    with source.client(token=token) as http:
        assert http.get("/v1/snapshot").status_code == 403
        assert http.put("/v1/snapshot", content=good).status_code == 403
    assert c.kv.get("refuse/probe")[1]["Value"] == b"after"


def _mesh(srv, *args: str) -> subprocess.CompletedProcess:
    env = {**srv.env, "CONSUL_HTTP_ADDR": srv.addr, "CONSUL_HTTP_TOKEN": srv.token or ""}
    return subprocess.run(
        [sys.executable, "-m", "meshweb.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_save_inspect_restore(source, tmp_path):
    c = source.consul()
    c.kv.put("cli/key", "one")
    path = tmp_path / "backup.snap"
    saved = _mesh(source, "snapshot", "save", "-no-audit", str(path))
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.startswith("Saved and verified snapshot to index ")
    shown = _mesh(source, "snapshot", "inspect", str(path))
    assert shown.returncode == 0, shown.stderr
    facts = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert facts["Version"] == str(archive.VERSION) and facts["Audit"] == "not included"
    assert int(facts["registry_kventry"]) >= 1 and "registry_auditentry" not in facts
    c.kv.put("cli/key", "two")
    restored = _mesh(source, "snapshot", "restore", str(path))
    assert restored.returncode == 0, restored.stderr
    assert c.kv.get("cli/key")[1]["Value"] == b"one"
    # a damaged file: a clear message, a non-zero exit, nothing sent
    path.write_bytes(path.read_bytes()[:100])
    for cmd in ("inspect", "restore"):
        bad = _mesh(source, "snapshot", cmd, str(path))
        assert bad.returncode != 0 and "truncated" in bad.stderr, bad.stderr
    assert c.kv.get("cli/key")[1]["Value"] == b"one"
