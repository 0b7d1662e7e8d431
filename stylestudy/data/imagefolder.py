"""Materialising an imagefolder for fetch: from a local folder or from parquet shards, reading nothing outside them.

A local imagefolder is copied file by file. A symbolic link is followed only to a file inside the folder (its bytes
become a regular file); a link that leaves the folder, a link to a folder and anything that is not a regular file are
left out. `metadata.csv` becomes `metadata.jsonl`. Parquet shards become one file per row under the image's own name
(`path` in the image struct) where it has a safe one, else `00000.png`-style names. What is left out is recorded with
its reason in data.FETCH_SKIPPED, which split folds into skipped.csv; rows with a bad name, a duplicate name or an empty
caption are written to metadata.jsonl as they are, so that split judges them the same way whatever the format.
"""
from __future__ import annotations

import csv
import os
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from stylestudy.core.config import UserError
from stylestudy.data.dataset import FETCH_SKIPPED, METADATA, fetch_skipped, name_key, name_problem, write_jsonl
from stylestudy.core.outputs import MANIFEST, write_csv

METADATA_CSV = "metadata.csv"
OUTSIDE = "symbolic link to outside the dataset folder"
MAGIC = [(b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp")]
OURS = {FETCH_SKIPPED, MANIFEST}  # written by fetch into the copy: a source file of that name is left out
Entry = tuple[str, Path | None, str | None]  # (name below the source, real file to read, why it is left out)


# ---------------------------------------------------------------------------------------------------- walking safely

def boundary(src: Path) -> Path:
    """The folder links may point into: the source itself, or for a Hub cache snapshot its repository folder.

    A snapshot's files are links to ../../blobs; that is the Hub client's layout, not an escape.
    """
    root = src.resolve()
    repo = root.parent.parent
    hub_layout = root.parent.name == "snapshots" and repo.name.startswith(("datasets--", "models--"))
    return repo if hub_layout and (repo / "blobs").is_dir() else root


def _readable(path: Path, root: Path) -> tuple[Path | None, str | None]:
    """The real file behind `path` when it is a regular file inside `root` (links followed), else (None, why)."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        return None, OUTSIDE  # decided from the link alone: the target is never opened, not even stat'ed
    try:
        mode = real.stat().st_mode
    except OSError:  # a dangling link, or a loop that realpath leaves unresolved
        return None, "broken symbolic link"
    if stat.S_ISDIR(mode):
        return None, "symbolic link to a folder (not followed)"
    return (real, None) if stat.S_ISREG(mode) else (None, "not a regular file")


def walk(src: Path, root: Path) -> Iterator[Entry]:
    """Every entry below `src`, sorted; a real folder comes as (name, None, None), a linked one is not entered."""
    errors: list[OSError] = []
    for folder, dirs, files in os.walk(src, onerror=errors.append):  # followlinks=False
        for name in sorted(dirs + files):
            path = Path(folder) / name
            relative = path.relative_to(src).as_posix()
            if relative in OURS:
                yield relative, None, "name reserved for fetch's own records"
            elif name in dirs and not path.is_symlink():
                yield relative, None, None
            else:
                yield relative, *_readable(path, root)
        dirs[:] = [d for d in dirs if Path(folder, d).relative_to(src).as_posix() not in OURS]
    for error in errors:
        yield Path(error.filename).relative_to(src).as_posix(), None, f"cannot read ({error.strerror})"


def _open(path: Path) -> BinaryIO:
    """Open a file checked to be regular; O_NOFOLLOW refuses a link swapped in since, O_NONBLOCK a FIFO."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb")


def write_skipped(out: Path, skipped: dict[str, str]) -> None:
    """Record what was left out of `out` and why, for split; nothing when nothing was."""
    if skipped:
        rows = [{"file_name": name, "reason": reason} for name, reason in skipped.items()]
        write_csv(out / FETCH_SKIPPED, rows, ["file_name", "reason"])


# ---------------------------------------------------------------------------------------------------- imagefolders

def copy_tree(src: Path, out: Path) -> dict[str, str]:
    """Copy every regular file below `src` (and links to files inside it) into `out`; return what was left out."""
    skipped, root = {}, boundary(src)
    for name, real, reason in walk(src, root):
        if reason:
            skipped[name] = reason
        elif real is None:
            (out / name).mkdir(parents=True, exist_ok=True)  # kept even when empty: `x.png/` is then named a folder
        else:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                with _open(real) as source, (out / name).open("wb") as target:
                    shutil.copyfileobj(source, target)
            except OSError as e:
                (out / name).unlink(missing_ok=True)
                skipped[name] = f"cannot read ({e.strerror})"
    return skipped


def read_metadata_csv(path: Path, shown: Path) -> list[dict]:
    """Rows of an imagefolder's metadata.csv (columns file_name, text and maybe more; a BOM is accepted)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            columns = reader.fieldnames or []
            if "file_name" not in columns or "text" not in columns:
                raise UserError(f"{shown}: columns {', '.join(columns) or 'none'}; its first line must name the "
                                "columns file_name (the image's path in the folder) and text (its caption)")
            # A short line leaves cells None: an empty file_name or caption, skipped by split with that reason.
            return [{k: v for k, v in row.items() if k is not None} | {"file_name": row["file_name"] or ""}
                    for row in reader]
        except UnicodeDecodeError:
            raise UserError(f"{shown}: not valid UTF-8 (near line {reader.line_num + 1}); re-save it as UTF-8") \
                from None
        except csv.Error as e:
            raise UserError(f"{shown}:{reader.line_num}: not CSV ({e}); fix that line") from None


def copy_imagefolder(src: Path, out: Path) -> None:
    """Copy a local imagefolder into `out`, reading nothing outside it; metadata.csv becomes metadata.jsonl."""
    skipped = copy_tree(src, out)
    metadata = METADATA if os.path.lexists(src / METADATA) else METADATA_CSV
    reason = skipped.get(metadata) or (None if (out / metadata).is_file() else "not a file")
    if reason:
        raise UserError(f"{src / metadata}: {reason}; put the metadata file itself in the folder")
    if metadata == METADATA_CSV:
        write_jsonl(out / METADATA, read_metadata_csv(out / METADATA_CSV, src / METADATA_CSV))
        (out / METADATA_CSV).unlink()  # one metadata file in data/raw, in one format
    write_skipped(out, skipped)


# ---------------------------------------------------------------------------------------------------- parquet

def _image_suffix(data: bytes) -> str:
    """File suffix from the magic bytes; '.bin' when they do not tell."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), ".bin")


def _parquet_batches(path: Path, columns: list[str]) -> Iterator[Any]:
    """Record batches of the given columns from one parquet file, with UserErrors for unreadable files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(path) as handle:
        try:
            file = pq.ParquetFile(handle)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{path}: not a readable parquet file ({e}); download it again") from None
        found = file.schema_arrow.names
        for column in columns:
            if column not in found:
                raise UserError(f"{path}: no column {column!r} (columns: {', '.join(found)}); give shards with "
                                f"columns {' and '.join(map(repr, columns))}, or an imagefolder with metadata.jsonl")
        yield from file.iter_batches(batch_size=64, columns=columns)


def _file_name(name: Any, data: Any, index: int, used: set[str]) -> str:
    """The image's own name where it has one (normalised when safe), else a free 00000.png-style name."""
    if isinstance(name, str) and name.strip():
        return name if name_problem(name) else name_key(name)
    suffix = _image_suffix(data if isinstance(data, bytes) else b"")
    candidate, n = f"{index:05d}{suffix}", 0
    while candidate in used:
        n += 1
        candidate = f"{index:05d}-{n}{suffix}"
    return candidate


def _parquet_row(image: Any, text: Any, index: int, out: Path, used: set[str], skipped: dict[str, str]) -> dict:
    """Write one row's image into `out` when its name is safe and new; return its metadata row."""
    data, name = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
    file_name = _file_name(name, data, index, used)
    row = {"file_name": file_name, "text": text if text is None or isinstance(text, str) else None}
    if name_problem(file_name) or file_name in used:
        return row  # never written: split names the bad name; a name listed again keeps its first image
    used.add(file_name)
    if not isinstance(text, (str, type(None))):
        skipped[file_name] = f"caption is not text ({type(text).__name__})"
    if not isinstance(data, bytes):
        skipped[file_name] = "no image bytes in the parquet row"
        return row
    try:
        (out / file_name).parent.mkdir(parents=True, exist_ok=True)
        (out / file_name).write_bytes(data)  # original bytes: no re-encoding loss
    except OSError as e:
        skipped[file_name] = f"cannot be written ({e.strerror})"
    return row


def parquet_to_imagefolder(
    parquet_files: list[Path], out_dir: Path, image_column: str = "image", text_column: str = "text"
) -> int:
    """Convert Hugging Face parquet shards (image column as struct {bytes, path}) to an imagefolder; return the row count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    used: set[str] = set()
    skipped: dict[str, str] = {}
    for path in parquet_files:
        for batch in _parquet_batches(Path(path), [image_column, text_column]):
            images, texts = batch.column(image_column).to_pylist(), batch.column(text_column).to_pylist()
            for image, text in zip(images, texts):
                rows.append(_parquet_row(image, text, len(rows), out_dir, used, skipped))
    write_jsonl(out_dir / METADATA, rows)
    write_skipped(out_dir, skipped)
    return len(rows)


def copy_parquet(src: Path, out: Path) -> None:
    """Convert the parquet shards below `src` (links followed only inside it) into an imagefolder in `out`."""
    # Sorted by name, so that rows without a name of their own get the same 00000.png-style names on every machine.
    entries = sorted((entry for entry in walk(src, boundary(src)) if entry[0].endswith(".parquet")), key=lambda e: e[0])
    shards = [real for _, real, reason in entries if real is not None]
    if not shards:
        raise UserError(f"{src}: no metadata.jsonl, metadata.csv or readable .parquet files; give an imagefolder "
                        "(images + metadata.jsonl or metadata.csv) or a folder of parquet shards")
    parquet_to_imagefolder(shards, out)
    skipped = {name: reason for name, _, reason in entries if reason} | fetch_skipped(out)  # shards, then rows
    write_skipped(out, skipped)


def copy_dataset(src: Path, out: Path) -> None:
    """An imagefolder (metadata.jsonl or metadata.csv) is copied, a folder of parquet shards converted to one."""
    if any(os.path.lexists(src / name) for name in (METADATA, METADATA_CSV)):
        copy_imagefolder(src, out)
    else:
        copy_parquet(src, out)
