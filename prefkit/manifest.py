"""Folders that can prove they are intact: ``manifest.json`` lists every file's size and sha256.

Used for checkpoints and for the converted-model cache. A folder is written whole into a
temporary place, its manifest last, then renamed into place; a reader verifies it before
trusting it (a kill, a full disk or a flipped byte shows up as a mismatch).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: list[Path]) -> list[str]:
    """The sha256 of each file, several at once: hashlib and file reads release the GIL, so a
    checkpoint's weights and optimizer state are hashed on two cores at the same time."""
    workers = min(len(paths), os.cpu_count() or 1)
    if workers <= 1:
        return [file_sha256(path) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_sha256, paths))


def write_manifest(folder: Path) -> None:
    """``manifest.json`` in ``folder``: every file's size and sha256, subfolders included."""
    folder = Path(folder)
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST]
    files = {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha}
             for path, sha in zip(paths, hash_files(paths))}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def verify_manifest(folder: Path) -> str | None:
    """``None`` if every file the manifest lists is there with its size and checksum; else what is wrong."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        items = [(str(name), int(expected["bytes"]), str(expected["sha256"])) for name, expected in files.items()]
    except FileNotFoundError:
        return "it has no manifest"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its manifest is unreadable ({type(exc).__name__})"
    for name, size, _ in items:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    found = hash_files([folder / name for name, _, _ in items])
    for (name, _, sha), actual in zip(items, found):
        if actual != sha:
            return f"{name} fails its checksum"
    return None
