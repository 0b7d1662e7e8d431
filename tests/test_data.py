"""Tests of stylestudy/data/dataset.py and stylestudy/data/imagefolder.py: synthetic sketches, split hashing, transforms, metadata errors,
image checks, parquet."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylestudy.core.config import UserError
from stylestudy.data.dataset import (
    CaptionedImages,
    check_example,
    fetch_skipped,
    read_jsonl,
    read_metadata,
    split_of,
    train_transforms,
    write_jsonl,
)
from stylestudy.data.imagefolder import parquet_to_imagefolder
from stylestudy.data.sketches import make_synthetic_sketches

FRACTIONS = {"train": 0.9, "val": 0.05, "test": 0.05}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _noise(mode: str = "RGB", size: tuple[int, int] = (48, 32)) -> Image.Image:
    """An RGB or L image of random pixels, so truncating its encoding really loses data."""
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------- synthetic

def test_synthetic_sketches_are_complete_and_deterministic(tmp_path: Path) -> None:
    make_synthetic_sketches(tmp_path / "a", n_images=40, size=64, seed=3)
    make_synthetic_sketches(tmp_path / "b", n_images=40, size=64, seed=3)
    rows = read_metadata(tmp_path / "a")
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(40)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([r["file_name"] for r in rows] + ["metadata.jsonl"])
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert all(r["text"].strip() for r in rows)
    assert len({r["text"] for r in rows}) > 10, "captions should vary with the scene"


def test_synthetic_sketches_are_dark_lines_on_white(tmp_path: Path) -> None:
    make_synthetic_sketches(tmp_path, n_images=20, size=64, seed=0)
    for row in read_metadata(tmp_path):
        with Image.open(tmp_path / row["file_name"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape == (64, 64, 3)
        white, dark = (pixels.min(-1) > 200).mean(), (pixels.max(-1) < 60).mean()
        assert white > 0.7 and dark > 0.01 and white + dark > 0.99, row


def test_synthetic_seed_changes_images(tmp_path: Path) -> None:
    make_synthetic_sketches(tmp_path / "a", n_images=5, size=32, seed=0)
    make_synthetic_sketches(tmp_path / "b", n_images=5, size=32, seed=1)
    same = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in os.listdir(tmp_path / "a")]
    assert not all(same)


def test_synthetic_is_fast(tmp_path: Path) -> None:
    import time

    start = time.perf_counter()
    make_synthetic_sketches(tmp_path, n_images=300, size=64, seed=0)
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------------------------------------------- splits

NAMES = [f"{i:05d}.png" for i in range(2000)]


def test_split_fractions_are_respected() -> None:
    counts = Counter(split_of(n, FRACTIONS) for n in NAMES)
    assert set(counts) == set(FRACTIONS)
    for split, fraction in FRACTIONS.items():
        assert abs(counts[split] / len(NAMES) - fraction) < 0.02, counts


def test_split_does_not_depend_on_order_or_process() -> None:
    here = [split_of(n, FRACTIONS) for n in NAMES[:300]]
    assert [split_of(n, FRACTIONS) for n in reversed(NAMES[:300])] == here[::-1]
    assert [split_of(n, dict(reversed(FRACTIONS.items()))) for n in NAMES[:300]] == here
    code = (
        "import json, sys; from stylestudy.data.dataset import split_of; "
        f"print(json.dumps([split_of(n, {FRACTIONS!r}) for n in {NAMES[:300]!r}]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


def test_split_known_assignment() -> None:
    # Pinned values: a change here moves files between splits and invalidates every earlier evaluation.
    known = ["a", "a", "b", "b", "b", "a", "b", "b"]
    assert [split_of(f"{i:05d}.png", {"a": 0.5, "b": 0.5}) for i in range(8)] == known


@pytest.mark.parametrize("fractions", [{"train": 0.9, "val": 0.2}, {"train": 0.5}, {}, {"train": 1.2, "val": -0.2}])
def test_split_rejects_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(UserError, match="sum to 1"):
        split_of("x.png", fractions)


# ---------------------------------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("image", [_noise("RGB", (90, 40)), _noise("L", (33, 70)), Image.new("RGBA", (50, 50), (0, 0, 0, 0))])
def test_transform_shape_and_range(image: Image.Image) -> None:
    out = train_transforms(16, center_crop=True, random_flip=False)(image)
    assert tuple(out.shape) == (3, 16, 16)
    assert out.dtype.is_floating_point and out.min() >= -1 and out.max() <= 1


def test_transparent_background_becomes_white() -> None:
    out = train_transforms(8, center_crop=True, random_flip=False)(Image.new("RGBA", (20, 20), (0, 0, 0, 0)))
    assert float(out.min()) == 1.0


def test_center_crop_is_deterministic_and_central() -> None:
    pixels = np.zeros((20, 60), dtype=np.uint8)
    pixels[:, 20:40] = 255  # only the middle third is white
    transform = train_transforms(20, center_crop=True, random_flip=False)
    a, b = transform(Image.fromarray(pixels)), transform(Image.fromarray(pixels))
    assert (a == b).all() and float(a.min()) == 1.0


def test_random_flip_flips() -> None:
    import torch

    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[:, :8] = 255  # left half white
    image, transform = Image.fromarray(pixels), train_transforms(16, center_crop=True, random_flip=True)
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(40)]
    left_white = [bool(o[:, :, :8].mean() > o[:, :, 8:].mean()) for o in outs]
    assert 5 < sum(left_white) < 35, "about half of the images should be flipped"
    flipped = next(o for o, w in zip(outs, left_white) if not w)
    assert torch.equal(flipped, outs[left_white.index(True)].flip(-1))
    torch.manual_seed(0)
    assert all(torch.equal(o, transform(image)) for o in outs), "same seed, same flips"


def test_captioned_images(tmp_path: Path) -> None:
    make_synthetic_sketches(tmp_path, n_images=3, size=40, seed=0)
    rows = read_metadata(tmp_path)
    dataset = CaptionedImages(tmp_path, rows, train_transforms(32, center_crop=False, random_flip=True))
    assert len(dataset) == 3
    item = dataset[2]
    assert tuple(item["pixel_values"].shape) == (3, 32, 32) and item["text"] == rows[2]["text"]


# ---------------------------------------------------------------------------------------------------- metadata

@pytest.mark.parametrize(
    "bad_line, message",
    [(b"{not json", "not JSON"), (b'{"file_name": "b.png", "text": "caf\xe9"}', "UTF-8"),
     (b'{"text": "a tree"}', "file_name"), (b'{"file_name": 7, "text": "a tree"}', "file_name"),
     (b'["b.png", "a tree"]', "JSON object")],
)
def test_read_metadata_errors_name_the_line(tmp_path: Path, bad_line: bytes, message: str) -> None:
    good = json.dumps({"file_name": "a.png", "text": "a house"}).encode()
    (tmp_path / "metadata.jsonl").write_bytes(good + b"\n\n" + bad_line + b"\n" + good + b"\n")
    with pytest.raises(UserError, match=message) as error:
        read_metadata(tmp_path)
    assert "metadata.jsonl:3" in str(error.value)


def test_read_metadata_keeps_rows_for_check_example_to_judge(tmp_path: Path) -> None:
    lines = [{"file_name": "a.png", "text": "a house"}, {"file_name": "b.png"}, {"file_name": "c.png", "text": None},
             {"file_name": "../d.png", "text": 3}]
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, lines)).encode())
    assert read_metadata(tmp_path) == lines, "a leading byte-order mark is accepted; no row stops the reading"


def test_read_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="metadata.jsonl"):
        read_metadata(tmp_path)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"file_name": "a.png", "text": "un café ☕"}, {"file_name": "b.png", "text": "x", "extra": 1}]
    write_jsonl(tmp_path / "sub" / "m.jsonl", rows)
    assert read_jsonl(tmp_path / "sub" / "m.jsonl") == rows
    assert os.listdir(tmp_path / "sub") == ["m.jsonl"], "no temporary file left behind"


# ---------------------------------------------------------------------------------------------------- check_example

def _cmyk_jpeg() -> bytes:
    return _jpeg(_noise("RGB").convert("CMYK"))


def _png16() -> bytes:
    return _png(Image.fromarray(np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30))


GOOD = {
    "gray16.png": _png16,
    "palette.png": lambda: _png(_noise("RGB").convert("P", palette=Image.Palette.ADAPTIVE)),
    "cmyk.jpg": _cmyk_jpeg,
    "one.png": lambda: _png(Image.new("RGB", (1, 1), "white")),
    "rgba.png": lambda: _png(_noise("RGB").convert("RGBA")),
    "photo.jpg": lambda: _jpeg(_noise("RGB")),
}
BAD = {
    "corrupt.png": (lambda: b"this is not an image at all", "not decodable"),
    "truncated.png": (lambda: _png(_noise("RGB"))[:-200], "not decodable"),
    "truncated.jpg": (lambda: _jpeg(_noise("RGB"))[:600], "not decodable"),
    "zero.png": (lambda: b"", "empty file"),
}


@pytest.mark.parametrize("name", GOOD)
def test_check_example_accepts(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(GOOD[name]())
    assert check_example(tmp_path, {"file_name": name, "text": "a tree"}) is None


@pytest.mark.parametrize("name", BAD)
def test_check_example_rejects_broken_files(tmp_path: Path, name: str) -> None:
    make, reason = BAD[name]
    (tmp_path / name).write_bytes(make())
    assert reason in (check_example(tmp_path, {"file_name": name, "text": "a tree"}) or "")


def test_check_example_rejects_missing_file_and_empty_caption(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    assert check_example(tmp_path, {"file_name": "nope.png", "text": "a tree"}) == "missing file"
    assert check_example(tmp_path, {"file_name": "ok.png", "text": ""}) == "empty caption"
    assert check_example(tmp_path, {"file_name": "ok.png", "text": " \t\n"}) == "empty caption"


@pytest.mark.parametrize("row, reason", [
    ({"file_name": "ok.png", "text": None}, "empty caption"),
    ({"file_name": "ok.png"}, "empty caption"),
    ({"file_name": "ok.png", "text": 3}, "caption is not text (int)"),
    ({"file_name": "ok.png", "text": ["a", "tree"]}, "caption is not text (list)"),
    ({"file_name": "../ok.png", "text": "a tree"}, "file_name leaves the dataset folder (absolute or '..')"),
    ({"file_name": "sub/../../ok.png", "text": "a tree"}, "file_name leaves the dataset folder (absolute or '..')"),
    ({"file_name": "/etc/hostname", "text": "a tree"}, "file_name leaves the dataset folder (absolute or '..')"),
    ({"file_name": "", "text": "a tree"}, "empty file_name"),
    ({"file_name": "./", "text": "a tree"}, "empty file_name"),
    ({"file_name": "metadata.jsonl", "text": "a tree"}, "file_name names the dataset's own records, not an image"),
    ({"file_name": "folder.png", "text": "a tree"}, "a folder where an image file should be"),
    ({"file_name": "small.png", "text": "a tree"}, "too small (40x31 < 32 px)"),
])
def test_check_example_names_each_row_problem(tmp_path: Path, row: dict, reason: str) -> None:
    (tmp_path / "ok.png").write_bytes(_png(Image.new("RGB", (32, 32))))
    (tmp_path / "small.png").write_bytes(_png(Image.new("RGB", (40, 31))))
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "metadata.jsonl").write_text("")
    assert check_example(tmp_path, row, min_size=32) == reason
    assert check_example(tmp_path, {"file_name": "ok.png", "text": "a tree"}, min_size=32) is None


def test_check_example_rejects_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.png").write_bytes(_png(Image.new("L", (100, 100))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "too large" in (check_example(tmp_path, {"file_name": "big.png", "text": "a tree"}) or "")


def test_sixteen_bit_gray_keeps_its_shades(tmp_path: Path) -> None:
    (tmp_path / "g.png").write_bytes(_png16())
    out = train_transforms(32, center_crop=True, random_flip=False)(Image.open(tmp_path / "g.png"))
    # The source is a ramp over the full 16-bit range: scaled, its mean is mid-gray; clipped, it is nearly all white.
    assert abs(float(out.mean())) < 0.2 and float(out.min()) < -0.9, "16-bit values should be scaled, not clipped"


# ---------------------------------------------------------------------------------------------------- parquet

def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    png, jpg = _png(_noise("RGB")), _jpeg(_noise("RGB"))
    images = [{"bytes": png, "path": "scene_1.PNG"}, {"bytes": jpg, "path": None}, {"bytes": png, "path": ""}]
    texts = ["a house", "a horse next to a tree", "a boat"]
    pq.write_table(pa.table({"image": images[:2], "text": texts[:2]}), tmp_path / "train-0.parquet")
    pq.write_table(pa.table({"image": images[2:], "text": texts[2:]}), tmp_path / "train-1.parquet")
    out = tmp_path / "folder"
    count = parquet_to_imagefolder([tmp_path / "train-0.parquet", tmp_path / "train-1.parquet"], out)
    rows = read_metadata(out)
    assert count == 3 and [r["text"] for r in rows] == texts
    assert [r["file_name"] for r in rows] == ["scene_1.PNG", "00001.jpg", "00002.png"], "own names kept where given"
    assert [(out / r["file_name"]).read_bytes() for r in rows] == [png, jpg, png]
    assert all(check_example(out, r) is None for r in rows)
    assert fetch_skipped(out) == {}


def test_parquet_rows_with_problems_are_kept_for_split_to_judge(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = _png(_noise("RGB"))
    images = [{"bytes": png, "path": p} for p in ["a/one.png", "../up.png", "/abs/x.png", "./a//one.png", "two.png",
                                                   "metadata.jsonl", "00000.png"]] + [None, {"bytes": None, "path": "far.png"}]
    texts = ["a house", "up", "abs", "the first again", None, "meta", "a tree", "no image", "far"]
    pq.write_table(pa.table({"image": images, "text": texts}), tmp_path / "s.parquet")
    out = tmp_path / "out"
    assert parquet_to_imagefolder([tmp_path / "s.parquet"], out) == 9
    rows = read_metadata(out)
    assert [r["file_name"] for r in rows] == ["a/one.png", "../up.png", "/abs/x.png", "a/one.png", "two.png",
                                              "metadata.jsonl", "00000.png", "00007.bin", "far.png"]
    assert [r["text"] for r in rows] == texts
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "00000.png", "a/one.png", "fetch_skipped.csv", "metadata.jsonl", "two.png"]
    assert (out / "a/one.png").read_bytes() == png and not (tmp_path / "up.png").exists()
    assert fetch_skipped(out) == {"00007.bin": "no image bytes in the parquet row",
                                  "far.png": "no image bytes in the parquet row"}


def test_parquet_caption_that_is_not_text_is_recorded(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png(_noise("RGB"))], "text": [7]}), tmp_path / "s.parquet")
    parquet_to_imagefolder([tmp_path / "s.parquet"], tmp_path / "out")
    assert read_metadata(tmp_path / "out") == [{"file_name": "00000.png", "text": None}]
    assert fetch_skipped(tmp_path / "out") == {"00000.png": "caption is not text (int)"}


def test_parquet_missing_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"], "caption": ["a"]}), tmp_path / "s.parquet")
    with pytest.raises(UserError, match=r"s\.parquet.*'image'.*img, caption") as error:
        parquet_to_imagefolder([tmp_path / "s.parquet"], tmp_path / "out")
    assert "params.yaml" not in str(error.value), "no parameter names the columns"


def test_parquet_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "s.parquet").write_text("hello")
    with pytest.raises(UserError, match=r"s\.parquet"):
        parquet_to_imagefolder([tmp_path / "s.parquet"], tmp_path / "out")
