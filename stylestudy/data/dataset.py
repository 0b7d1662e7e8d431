"""Shared dataset code: imagefolder reading and checks, split hashing, transforms.

An imagefolder is a folder of images plus `metadata.jsonl`, one JSON object per line with `file_name` (relative to
the folder) and `text` (the caption). What fetch left out of a copied folder, and why, is in `fetch_skipped.csv`.
torch and torchvision are imported inside the functions that need them.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, ImageOps

from stylestudy.core.config import EDIT_HINT, UserError
from stylestudy.core.outputs import MANIFEST, atomic_file, read_csv

METADATA = "metadata.jsonl"
FETCH_SKIPPED = "fetch_skipped.csv"  # file_name, reason: what fetch did not copy into the imagefolder
RESERVED = {METADATA, "metadata.csv", FETCH_SKIPPED, MANIFEST}  # the folder's own records, never an image's name
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------------- jsonl files

def _jsonl_rows(path: Path, bad: list[tuple[int, str]] | None = None) -> list[tuple[int, dict]]:
    """Parse a JSONL file line by line into (line number, object); blank lines are skipped, a leading BOM accepted.

    A line that is no object stops with a UserError naming the file and line, or, when `bad` is given, is appended
    to it as (line number, reason) and skipped."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; create it or fix the path")

    def refuse(number: int, reason: str, remedy: str) -> None:
        if bad is None:
            raise UserError(f"{path}:{number}: {reason}; {remedy}")
        bad.append((number, reason))

    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = (raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw).decode("utf-8")
            except UnicodeDecodeError:
                refuse(number, "not valid UTF-8", "re-save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                refuse(number, f"not JSON ({e.msg})", "fix or delete that line")
                continue
            if not isinstance(row, dict):
                refuse(number, f"expected a JSON object, got {type(row).__name__}", "fix that line")
                continue
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


def read_metadata_lines(folder: Path, bad: list[tuple[int, str]] | None = None) -> list[tuple[int, dict]]:
    """(line number, row) of an imagefolder's metadata.jsonl; whether each is usable is check_example's call.

    A line that is no JSON object or names no file cannot be judged by its file: it stops here with one line, or,
    when `bad` is given, goes there as (line number, reason)."""
    path = folder / METADATA
    rows = []
    for number, row in _jsonl_rows(path, bad):
        if isinstance(row.get("file_name"), str):
            rows.append((number, row))
        elif bad is None:
            raise UserError(f'{path}:{number}: no "file_name" string; every line needs "file_name": "<image path>"'
                            " (fix or delete that line)")
        else:
            bad.append((number, 'no "file_name" string'))
    return rows


def read_metadata(folder: Path) -> list[dict]:
    """Rows of an imagefolder's metadata.jsonl; a line that is no row stops with one line naming it."""
    return [row for _, row in read_metadata_lines(folder)]


def fetch_skipped(folder: Path) -> dict[str, str]:
    """What fetch left out of an imagefolder and why (file_name -> reason); empty when it left nothing out."""
    path = folder / FETCH_SKIPPED
    return {row["file_name"]: row["reason"] for row in read_csv(path)} if path.is_file() else {}


def name_key(file_name: str) -> str:
    """The name as the file system sees it ("./a//b.png" is "a/b.png"), so that one file is one example."""
    return str(PurePosixPath(file_name))


def name_problem(file_name: str) -> str | None:
    """Why a file_name cannot name a file inside the dataset folder, or None."""
    name = PurePosixPath(file_name)
    if not file_name.strip() or not name.parts:  # "", " ", "." and "./" name the folder itself
        return "empty file_name"
    if name.is_absolute() or ".." in name.parts:
        return "file_name leaves the dataset folder (absolute or '..')"
    if "\x00" in file_name:
        return "file_name holds a NUL character"
    if str(name) in RESERVED:
        return "file_name names the dataset's own records, not an image"
    return None


# ---------------------------------------------------------------------------------------------------- splits

def check_fractions(fractions: dict[str, float]) -> None:
    """Split fractions (e.g. {"train": 0.9, "val": 0.05, "test": 0.05}) must be in [0, 1] and sum to 1."""
    values = list(fractions.values())
    if not values or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise UserError(f"split.fractions {fractions} must be in [0, 1] and sum to 1; "
                        f"{EDIT_HINT.format(key='split.fractions.train')}")


def split_of(file_name: str, fractions: dict[str, float]) -> str:
    """Assign an image to a split by hashing its name as the file system sees it (name_key): stable across runs and
    machines, and every row of one image (each of its captions) goes to the same split."""
    check_fractions(fractions)
    # sha256, not hash(): hash() of a str changes with PYTHONHASHSEED, so splits would differ between processes.
    u = int.from_bytes(hashlib.sha256(name_key(file_name).encode("utf-8")).digest()[:8], "big") / 2**64
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


def caption_problem(text: Any) -> str | None:
    """Why a caption cannot be trained on (missing, null, blank or not a string), or None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return "empty caption"
    return None if isinstance(text, str) else f"caption is not text ({type(text).__name__})"


def file_problem(path: Path) -> str | None:
    """Why a path holds no image file to open (missing, a folder, empty), or None."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "missing file"
    except OSError as e:
        return f"cannot read file ({e.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "a folder where an image file should be"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return "empty file" if info.st_size == 0 else None


def image_problem(path: Path, min_size: int) -> str | None:
    """Why an image file cannot be trained on (too small, too large, not decodable), or None."""
    try:
        with Image.open(path) as image:
            if min(image.size) < min_size:  # from the header: a small image is never decoded
                return f"too small ({image.width}x{image.height} < {min_size} px)"
            image.load()
            to_rgb(image)
    except Image.DecompressionBombError:
        return "image too large (decompression bomb)"
    # Broken files surface as OSError, SyntaxError, ValueError, struct.error and more, depending on the plugin.
    except Exception as e:  # noqa: BLE001
        # Without the folder in it, a reason reads the same wherever the dataset was copied to.
        return f"not decodable: {type(e).__name__}: {str(e).replace(str(path), path.name)}"
    return None


def check_example(folder: Path, row: dict, min_size: int = 1) -> str | None:
    """Why an example is unusable (bad file_name, empty caption, missing, too small or broken file), or None."""
    reason = name_problem(row["file_name"]) or caption_problem(row.get("text"))
    if reason:
        return reason
    path = folder / row["file_name"]
    return file_problem(path) or image_problem(path, min_size)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `size`, as torchvision's Resize(size) computes it."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def mirrored(crop: Any) -> Any:
    """The crop record (original h, w, crop top, left, target h, w) of the horizontally flipped crop: its left edge
    measured in the flipped resized image."""
    height, width, top, left, target_h, target_w = (int(v) for v in crop)
    return crop.new_tensor([height, width, top, resized_size(height, width, target_h)[1] - left - target_w,
                            target_h, target_w])


class TrainTransform:
    """RGB PIL image -> float tensor in [-1, 1], C x resolution x resolution: the shorter side resized to `resolution`
    (bilinear), a center or random crop, an optional horizontal flip; `framed` returns also where the crop lay.

    The random draws are torchvision's RandomCrop and RandomHorizontalFlip's, in their order (crop, then flip)."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool) -> None:
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __call__(self, image: Image.Image) -> Any:
        return self.framed(image)[0]

    def framed(self, image: Image.Image) -> tuple[Any, Any]:
        """The pixels and the crop record (original h, w, crop top, left, target h, w; int64) of the pixels as
        returned: SDXL's time ids, the crop top-left in the resized (and, when flipped, mirrored) image."""
        import torch
        from torchvision.transforms import InterpolationMode, RandomCrop
        from torchvision.transforms import functional as F

        image, size = to_rgb(image), self.resolution
        original = (image.height, image.width)
        image = F.resize(image, list(resized_size(*original, size)), interpolation=InterpolationMode.BILINEAR)
        if self.center_crop:  # torchvision's CenterCrop offsets
            top, left = int(round((image.height - size) / 2.0)), int(round((image.width - size) / 2.0))
        else:
            top, left, _, _ = RandomCrop.get_params(image, (size, size))
        image = F.crop(image, top, left, size, size)
        crop = torch.tensor([*original, top, left, size, size])
        if self.random_flip and torch.rand(1) < 0.5:
            image, crop = F.hflip(image), mirrored(crop)
        return F.normalize(F.to_tensor(image), [0.5], [0.5]), crop


def train_transforms(resolution: int, center_crop: bool, random_flip: bool) -> TrainTransform:
    """The training transform (TrainTransform): resize the shorter side, then center or random crop, optional
    horizontal flip."""
    return TrainTransform(resolution, center_crop, random_flip)


class CaptionedImages:
    """Items: {"pixel_values": tensor, "text": caption, "crop": the crop record (TrainTransform.framed)} from an
    imagefolder and a list of rows."""

    # A map-style dataset needs only __len__ and __getitem__; not subclassing torch's Dataset keeps torch out of
    # `import stylestudy.data.dataset` while instances still pickle for DataLoader workers.
    def __init__(self, folder: Path, rows: list[dict], transform: TrainTransform) -> None:
        self.folder, self.rows, self.transform = Path(folder), list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        path = self.folder / row["file_name"]
        try:
            image = load_rgb(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: cannot read image ({e}); run the split stage again to drop bad files") from None
        pixels, crop = self.transform.framed(image)
        return {"pixel_values": pixels, "text": row["text"], "crop": crop}


STYLE_DATASETS = ("zoheb/sketch-scene",)  # the study's: its images are sketches


def images_noun(origin: dict) -> str:
    """What the report and the model card call the dataset's images, from its fetch manifest: "sketches" for the
    study's dataset and the synthetic one, "real images" for anyone else's (a user's own style)."""
    study = origin.get("source") == "hub" and origin.get("repo_id") in STYLE_DATASETS
    return "sketches" if study or origin.get("source") == "synthetic" else "real images"
