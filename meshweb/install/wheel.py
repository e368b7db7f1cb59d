"""The meshweb wheel agents install: built from the code this process runs.

Why not `pip wheel` or `python -m build`: a control plane installed from a
wheel (the container image, a venv) has no source tree to build from. The
files of the running packages are the source of truth, so the wheel is packed
from them and from the installed distribution's metadata (dependencies, entry
points). Packing is reproducible (sorted entries, fixed timestamps and
modes): every replica of a deployment serves byte-identical wheels. The
version is the distribution's plus a local label of the code's digest
(`0.1.0+g1a2b3c4d5e6f`), so a host re-running the script after an upgrade of
the control plane gets the new code, and an unchanged one is left alone.

The wheel is built once per process and kept in `MESH_DATA_DIR/downloads/`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

DIST = "meshweb"
PACKAGES = ("meshweb", "registry", "agents", "gateways", "frontend", "meshproto", "clouds")
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold
WHEEL_NAME = re.compile(r"^meshweb-[0-9][0-9A-Za-z.+_]*-py3-none-any\.whl$")


@dataclass(frozen=True)
class Wheel:
    """A built wheel: where it is, its file name, version and SHA-256 (hex)."""

    path: Path
    name: str
    version: str
    sha256: str


def _package_files() -> list[tuple[str, Path]]:
    """(archive name, file) for every file of the running packages, sorted."""
    files: list[tuple[str, Path]] = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for filename in filenames:
                if filename.endswith(_SKIP_SUFFIXES):
                    continue
                path = Path(dirpath) / filename
                files.append((f"{package}/{path.relative_to(root).as_posix()}", path))
    return sorted(files)


def _digest(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, path in files:
        data = path.read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _metadata(dist: importlib.metadata.Distribution, version: str) -> str:
    """The distribution's metadata with our version and its dependencies.

    From a wheel install it is `METADATA`; from a source checkout it may be an
    egg-info's `PKG-INFO` (+ `requires.txt`): both become core metadata 2.1.
    """
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    head, _sep, body = text.partition("\n\n")
    drop = ("Metadata-Version:", "Name:", "Version:", "Requires-Dist:")
    kept = [line for line in head.split("\n") if line and not line.startswith(drop)]
    lines = ["Metadata-Version: 2.1", f"Name: {DIST}", f"Version: {version}", *kept]
    lines += [f"Requires-Dist: {req}" for req in dist.requires or []]
    return "\n".join(lines) + "\n\n" + body


def build(dest_dir: Path) -> Wheel:
    """Pack the running code into `dest_dir` (kept if already there); the wheel."""
    dist = importlib.metadata.distribution(DIST)
    files = _package_files()
    version = f"{dist.version.split('+')[0]}+g{_digest(files)[:12]}"
    name = f"{DIST}-{version}-py3-none-any.whl"
    path = dest_dir / name
    if not path.exists():
        dest_dir.mkdir(parents=True, exist_ok=True)
        info = f"{DIST}-{version}.dist-info"
        extra = {
            f"{info}/METADATA": _metadata(dist, version).encode(),
            f"{info}/WHEEL": (
                b"Wheel-Version: 1.0\nGenerator: meshweb\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            ),
            f"{info}/entry_points.txt": (dist.read_text("entry_points.txt") or "").encode(),
            f"{info}/top_level.txt": "".join(f"{p}\n" for p in PACKAGES).encode(),
        }
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".building-", suffix=".whl")
        os.close(fd)
        try:
            record: list[str] = []
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                entries = [(n, p.read_bytes()) for n, p in files] + sorted(extra.items())
                for arcname, data in entries:
                    zi = zipfile.ZipInfo(arcname, date_time=_EPOCH)
                    zi.external_attr = 0o644 << 16
                    zi.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(zi, data)
                    record.append(f"{arcname},{_record_hash(data)},{len(data)}")
                record.append(f"{info}/RECORD,,")
                zi = zipfile.ZipInfo(f"{info}/RECORD", date_time=_EPOCH)
                zi.external_attr = 0o644 << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(zi, "\n".join(record) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # atomic: a concurrent reader sees all of it or nothing
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    # Wheels of earlier code are no longer served (a process still running one
    # that shares this directory builds it again on its next request).
    for old in dest_dir.glob(f"{DIST}-*.whl"):
        if old != path:
            old.unlink(missing_ok=True)
    return Wheel(path, name, version, hashlib.sha256(path.read_bytes()).hexdigest())


_lock = threading.Lock()
_current: Wheel | None = None


def current(data_dir: Path) -> Wheel:
    """This process's wheel, built on first use (later calls are a lookup)."""
    global _current
    with _lock:
        if _current is None or not _current.path.exists():
            _current = build(data_dir / "downloads")
        return _current
