"""Writing outputs whole: temporary path then rename, JSON and CSV helpers, file manifests."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "fetch_manifest.json"  # what fetch writes into every folder it materialises
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "open-clip-torch", "huggingface-hub", "pillow")


def _temporary_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `final` only when the block finishes without error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a run that was killed
        _remove(stale)
    tmp = _temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(final)
    tmp.rename(final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces `final` only when the block finishes without error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, final)


def write_json(path: Path, data: Any) -> None:
    """Write JSON whole (sorted keys, so that identical runs give identical files)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, rows: list[dict], header: list[str]) -> None:
    """Write a list of flat dicts as CSV whole."""
    with atomic_file(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below a folder, keyed by its path relative to the folder."""
    return {
        str(path.relative_to(folder)): sha256_of(path) for path in sorted(folder.rglob("*")) if path.is_file()
    }


def fetch_origin(folder: Path) -> dict:
    """What fetch recorded about a folder it materialised (source, revision), without its file list; {} if none."""
    manifest = folder / MANIFEST
    return {k: v for k, v in json.loads(manifest.read_text()).items() if k != "files"} if manifest.is_file() else {}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape our outputs, recorded beside every model folder."""
    return {name: metadata.version(name) for name in LIBRARIES}


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted: safetensors writes them in hash-map order,
    which differs from process to process, so the same tensors would give other bytes (and another DVC hash)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))} | header
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to keep the data 8-byte aligned
    with atomic_file(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
