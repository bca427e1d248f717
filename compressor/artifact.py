"""The artifact: one directory, written atomically (a temporary sibling directory, then a rename).

Files (same inputs + seed -> byte-identical files, except ``timings.json``):

- ``manifest.json``  schema, sparsec version, source model hash, recipe, target, seed, and the sha256 of every file
- ``weights.safetensors``  every tensor of the compressed graph (identical tensors stored once)
- ``graph.json``  the IR (nodes, formats, and which tensors they use)
- ``model.onnx``  the portable model (onnxruntime runs it)
- ``report.json``  the pass reports and quality figures (see report.py)
- ``timings.json``  wall-clock seconds per pass and layer: not deterministic, so kept apart and out of the manifest
- ``lib/``  compiled code for the target, when a backend built it
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ArtifactError, OutputError
from .ir import Graph, dumps_json

ARTIFACT_SCHEMA = "sparsec.artifact/1"
# lib/model.so: TVM 0.27's VMShapeLower numbers the VM's shape-heap slots in an order that varies between runs
# (equivalent code, different bytes); every other file of lib/ is byte-identical (see backends/build.py)
NONDETERMINISTIC = ("timings.json", "lib/model.so")


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_key(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(np.asarray(a, order="C").tobytes())
    return h.hexdigest()


def dedupe_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Store identical tensors once. Returns (unique tensors, alias -> canonical name)."""
    seen: dict[str, str] = {}
    unique: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    for name in sorted(tensors):
        a = tensors[name]
        k = _tensor_key(a)
        if k in seen:
            aliases[name] = seen[k]
        else:
            seen[k] = name
            unique[name] = a
    return unique, aliases


def serialize_weights(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.asarray(v, order="C") for k, v in tensors.items()})


ARTIFACT_EXTRAS = ("manifest.json", "timings.json", "lib", "bench.json", "bench.md")  # sparsec files the checksums leave out


def not_an_artifact(out: Path) -> str:
    """Why the non-empty directory ``out`` is not a sparsec artifact that ``--force`` may replace ("" when it is one):
    its manifest.json must be sparsec's (a JSON object with ``sparsec_version`` and its ``files``), and it may hold
    nothing but the files that manifest lists (and timings.json, lib/). A web extension's or another tool's
    manifest.json, or an artifact folder the user added files to, is not replaced."""
    man = out / "manifest.json"
    if not man.is_file():
        return "no manifest.json"
    try:
        m = json.loads(man.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return "its manifest.json is not sparsec's"
    if not isinstance(m, dict) or "sparsec_version" not in m or not isinstance(m.get("files"), dict):
        return "its manifest.json is not sparsec's"
    known = {str(k).split("/", 1)[0] for k in m["files"]} | set(ARTIFACT_EXTRAS)
    other = sorted(e.name for e in out.iterdir() if e.name not in known)
    if other:
        return f"it also holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}"
    return ""


def check_output_dir(out: str | Path, force: bool = False) -> Path:
    """Fail early (before any work) when the output cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and any(out.iterdir()):
        # --force replaces an artifact (or an empty directory), never a folder of the user's
        why = not_an_artifact(out)
        if why:
            raise OutputError(f"{out}: exists and is not a sparsec artifact ({why}); refusing to replace it even with "
                              f"--force: remove it or choose another -o")  # fmt: skip
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.path.isdir(probe):
        raise OutputError(f"{out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: directory {probe} is not writable")
    try:  # what os.access cannot tell (root, read-only or pseudo file systems such as /proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".sparsec-probe-", dir=probe))
    except OSError as e:
        raise OutputError(f"{out}: cannot write in {probe} ({e.strerror or e})")
    return out


@dataclass
class ArtifactContent:
    graph: Graph
    manifest: dict[str, Any]
    report: dict[str, Any]
    onnx_bytes: bytes | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    writers: list[tuple[str, Callable[[Path], None]]] = field(default_factory=list)  # (subdir, fn(dir)) e.g. lib/


def temp_sibling(parent: Path, name: str) -> Path:
    """A fresh temporary directory in ``parent`` that becomes ``name`` by rename, with the mode a plain ``mkdir``
    would give it (mkdtemp's 0700 would make every artifact unreadable to other users, whatever the umask)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    """The process umask, read without setting it where Linux shows it (os.umask is the only portable way, and it
    changes the mask for every thread for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_artifact(out: str | Path, content: ArtifactContent, force: bool = False) -> Path:
    out = check_output_dir(out, force)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(parent, out.name)
    except OSError as e:
        raise OutputError(f"{out}: cannot create a directory there ({e.strerror or e})")
    try:
        doc, tensors = content.graph.to_json()
        unique, aliases = dedupe_tensors(tensors)
        doc["tensor_aliases"] = aliases
        files: dict[str, bytes] = {
            "weights.safetensors": serialize_weights(unique),
            "graph.json": dumps_json(doc).encode(),
            "report.json": dumps_json(content.report).encode(),
        }
        if content.onnx_bytes is not None:
            files["model.onnx"] = content.onnx_bytes
        for name, data in files.items():
            _write(tmp / name, data)
        for sub, fn in content.writers:
            d = tmp / sub
            d.mkdir(parents=True, exist_ok=True)
            fn(d)
        manifest = dict(content.manifest)
        manifest["schema"] = ARTIFACT_SCHEMA
        listing = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                if rel in NONDETERMINISTIC:
                    continue
                listing[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest["files"] = listing
        _write(tmp / "manifest.json", dumps_json(manifest).encode())
        _write(tmp / "timings.json", json.dumps(content.timings, sort_keys=True, indent=1).encode())
        _os_fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            old.rmdir()
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{out}: write failed ({e.strerror or e})")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _os_fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    timings: dict[str, Any]
    _graph: Graph | None = None

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            self._graph = load_graph(self.path)
        return self._graph

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def lib_dir(self) -> Path:
        return self.path / "lib"


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path.parent}: not a sparsec artifact ({what} is missing)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt {what} ({e})")


def load_artifact(path: str | Path, verify: bool = False) -> Artifact:
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"{p}: not an artifact directory")
    manifest = _read_json(p / "manifest.json", "manifest.json")
    if manifest.get("schema") != ARTIFACT_SCHEMA:
        raise ArtifactError(f"{p}: artifact schema {manifest.get('schema')!r}, this sparsec reads {ARTIFACT_SCHEMA!r}")
    report = _read_json(p / "report.json", "report.json")
    timings = {}
    if (p / "timings.json").exists():
        timings = _read_json(p / "timings.json", "timings.json")
    a = Artifact(p, manifest, report, timings)
    if verify:
        verify_files(a, list(manifest.get("files", {})))
    return a


def verify_files(a: "Artifact", rels: list[str]) -> None:
    """The artifact's files ``rels`` (those a run reads) against their sha256 in manifest.json: a file edited or
    truncated after the artifact was written is an ArtifactError, not outputs computed from it."""
    listing = a.manifest.get("files", {})
    for rel in rels:
        info = listing.get(rel)
        if info is None:
            continue
        f = a.path / rel
        if not f.exists():
            raise ArtifactError(f"{a.path}: {rel} is missing")
        if sha256_file(f) != info["sha256"]:
            raise ArtifactError(f"{a.path}: {rel} does not match its checksum in manifest.json (changed after the artifact was written)")


def load_graph(path: str | Path) -> Graph:
    from safetensors.numpy import load_file

    p = Path(path)
    doc = _read_json(p / "graph.json", "graph.json")
    try:
        tensors = load_file(str(p / "weights.safetensors"))
    except FileNotFoundError:
        raise ArtifactError(f"{p}: weights.safetensors is missing")
    except Exception as e:
        raise ArtifactError(f"{p}: weights.safetensors cannot be read ({e})")
    for alias, canon in doc.get("tensor_aliases", {}).items():
        tensors[alias] = tensors[canon]
    return Graph.from_json(doc, tensors)
