"""Shared dataset code: imagefolder reading and checks, split hashing, transforms.

An imagefolder is a folder of images plus `metadata.jsonl`, one JSON object per line with `file_name` (relative to
the folder) and `text` (the caption). torch and torchvision are imported inside the functions that need them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from PIL import Image, ImageOps

from stages.config import UserError
from stages.outputs import atomic_file

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAGIC = [(b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp")]


# ---------------------------------------------------------------------------------------------------- jsonl files

def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSONL file line by line into (line number, object); blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; create it or fix the path")
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: not valid UTF-8; re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}; fix that line")
            rows.append((number, row))
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file of objects; a bad line is a UserError naming the file and line."""
    return [row for _, row in _jsonl_rows(path)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as UTF-8 JSONL, whole: to a temporary name, then renamed."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_metadata(folder: Path) -> list[dict]:
    """Read metadata.jsonl of an imagefolder, one line at a time, with clear errors."""
    path = folder / METADATA
    rows = []
    for number, row in _jsonl_rows(path):
        for key in ("file_name", "text"):
            if key not in row:
                raise UserError(f"{path}:{number}: missing key {key!r}; every line needs file_name and text")
            if not isinstance(row[key], str):
                raise UserError(f"{path}:{number}: {key!r} must be a string, got {type(row[key]).__name__}")
        name = PurePosixPath(row["file_name"])
        if name.is_absolute() or ".." in name.parts:
            raise UserError(f"{path}:{number}: file_name {row['file_name']!r} must be relative to {folder}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- splits

def split_of(file_name: str, fractions: dict[str, float]) -> str:
    """Assign a file to a split (e.g. {"train": 0.9, "val": 0.05, "test": 0.05}) by hashing its name: stable across runs and machines."""
    values = list(fractions.values())
    if not values or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise UserError(f"split fractions {fractions} must be in [0, 1] and sum to 1; fix them in params.yaml")
    # sha256, not hash(): hash() of a str changes with PYTHONHASHSEED, so splits would differ between processes.
    u = int.from_bytes(hashlib.sha256(file_name.encode("utf-8")).digest()[:8], "big") / 2**64
    # Sorted names, so the order of keys in params.yaml does not move files between splits.
    names = sorted(fractions)
    edge = 0.0
    for name in names:
        edge += fractions[name]
        if u < edge:
            return name
    return [n for n in names if fractions[n] > 0][-1]  # u just under 1 when the fractions sum a hair below 1


# ---------------------------------------------------------------------------------------------------- images

def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to RGB: EXIF rotation applied, 16-bit scaled to 8, transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # convert("L") clips rather than scales, which turns a 16-bit grayscale image almost entirely white.
        peak = 255 if image.getextrema()[1] <= 255 else 65535
        image = image.point(lambda v: v * (255 / peak)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Sketches with a transparent background would turn black under a plain convert("RGB").
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Open an image file fully decoded and converted to RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def check_example(folder: Path, row: dict) -> str | None:
    """Return why an example is unusable (missing file, not decodable, not RGB-convertible, empty caption), or None."""
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        return "empty caption"
    path = folder / row["file_name"]
    if not path.is_file():
        return "missing file"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        load_rgb(path)
    except Image.DecompressionBombError:
        return "image too large (decompression bomb)"
    # Broken files surface as OSError, SyntaxError, ValueError, struct.error and more, depending on the plugin.
    except Exception as e:  # noqa: BLE001
        return f"not decodable: {type(e).__name__}: {e}"
    return None


def train_transforms(resolution: int, center_crop: bool, random_flip: bool) -> Callable[[Image.Image], Any]:
    """torchvision transform: RGB PIL image -> float tensor in [-1, 1], C x resolution x resolution (resize shorter side, then center or random crop, optional horizontal flip)."""
    from torchvision import transforms

    steps = [
        transforms.Lambda(to_rgb),  # a module-level function, so DataLoader workers can pickle it
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    return transforms.Compose(steps)


class CaptionedImages:
    """Items: {"pixel_values": tensor, "text": caption} from an imagefolder and a list of rows."""

    # A map-style dataset needs only __len__ and __getitem__; not subclassing torch's Dataset keeps torch out of
    # `import stages.data` while instances still pickle for DataLoader workers.
    def __init__(self, folder: Path, rows: list[dict], transform: Callable[[Image.Image], Any]) -> None:
        self.folder, self.rows, self.transform = Path(folder), list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        path = self.folder / row["file_name"]
        try:
            image = load_rgb(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: cannot read image ({e}); re-run the data stage to drop bad files") from None
        return {"pixel_values": self.transform(image), "text": row["text"]}


# ---------------------------------------------------------------------------------------------------- parquet

def _image_suffix(data: bytes, name: str | None) -> str:
    """File suffix from the original name, else from the magic bytes; '.bin' when neither tells."""
    suffix = PurePosixPath(name).suffix.lower() if name else ""
    if suffix in IMAGE_SUFFIXES:
        return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), ".bin")


def _parquet_batches(path: Path, columns: list[str]) -> Iterator[Any]:
    """Record batches of the given columns from one parquet file, with UserErrors for unreadable files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path}: not a readable parquet file ({e}); download it again") from None
    found = file.schema_arrow.names
    for column in columns:
        if column not in found:
            raise UserError(
                f"{path}: no column {column!r} (columns: {', '.join(found)}); set the column name in params.yaml"
            )
    return file.iter_batches(batch_size=64, columns=columns)


def parquet_to_imagefolder(
    parquet_files: list[Path], out_dir: Path, image_column: str = "image", text_column: str = "text"
) -> int:
    """Convert Hugging Face parquet shards (image column as struct {bytes, path}) to an imagefolder; return the row count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for path in parquet_files:
        for batch in _parquet_batches(Path(path), [image_column, text_column]):
            images, texts = batch.column(image_column).to_pylist(), batch.column(text_column).to_pylist()
            for image, text in zip(images, texts):
                data, name = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
                if not isinstance(data, bytes):
                    raise UserError(f"{path}: row {len(rows)} has no image bytes; use shards with embedded images")
                if text is not None and not isinstance(text, str):
                    raise UserError(f"{path}: {text_column!r} holds {type(text).__name__}; name a text column")
                file_name = f"{len(rows):05d}{_image_suffix(data, name)}"
                (out_dir / file_name).write_bytes(data)  # original bytes: no re-encoding loss
                rows.append({"file_name": file_name, "text": text or ""})
    write_jsonl(out_dir / METADATA, rows)
    return len(rows)
