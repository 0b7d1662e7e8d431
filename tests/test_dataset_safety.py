"""A user's dataset folder: nothing outside it is read, and every format gives the same split and skipped.csv.

Links that leave the folder, names that climb out of it and special files are skipped with their reason, which
reaches data/split/skipped.csv through fetch's fetch_skipped.csv.
"""
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, PngImagePlugin

from stages import split
from stylestudy.data import imagefolder
from stylestudy.core.config import UserError, compose_params
from stylestudy.data.dataset import FETCH_SKIPPED, read_metadata, write_jsonl
from stylestudy.data.imagefolder import OUTSIDE, copy_dataset
from stylestudy.data.sketches import make_synthetic_sketches

REPO = Path(__file__).resolve().parents[1]
MARKER = "secret-" + uuid.uuid4().hex  # made at run time, so that no source file holds it
LEAVES = "file_name leaves the dataset folder (absolute or '..')"
SPLIT = {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "max_bad_fraction": 0.5, "min_image_size": 32}


def secret_png(path: Path) -> None:
    """A valid image holding the marker: were it copied, it would even be trained on."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", MARKER)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "white").save(path, pnginfo=info)


def stage(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=workdir, env=env, capture_output=True, text=True)


def params_for(workdir: Path, dataset: Path) -> None:
    """Smoke params with the dataset as a local source and room for the bad rows of these tests."""
    compose_params(workdir / "params.yaml", REPO, ["profile=smoke"])
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["fetch"]["data"] |= {"source": "local", "path": str(dataset)}
    params["split"]["max_bad_fraction"] = 0.5
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def linked_dataset(root: Path) -> tuple[Path, Path]:
    """A dataset folder with links out of it (to a file, a folder, absolute and relative) and links inside it."""
    outside, ds = root / "outside", root / "dataset"
    secret_png(outside / "secret.png")
    secret_png(outside / "dir" / "inner.png")
    (outside / "notes.txt").write_text(MARKER)
    make_synthetic_sketches(ds, 20, 32, seed=0)
    (ds / "secret.png").symlink_to("../outside/secret.png")
    (ds / "absolute.png").symlink_to(outside / "secret.png")
    (ds / "sub").mkdir()
    (ds / "sub" / "climb.png").symlink_to("../../outside/secret.png")
    (ds / "sub" / "up.png").symlink_to("../00001.png")  # stays inside: copied as a file
    (ds / "outside_dir").symlink_to(outside / "dir")
    (ds / "notes.txt").symlink_to(outside / "notes.txt")
    (ds / "inside.png").symlink_to("00000.png")
    (ds / "x.png").mkdir()  # a folder named like an image
    names = ["secret.png", "absolute.png", "sub/climb.png", "sub/up.png", "outside_dir/inner.png", "inside.png",
             "x.png", "../outside/secret.png", str(outside / "secret.png")]
    write_jsonl(ds / "metadata.jsonl", read_metadata(ds) + [{"file_name": n, "text": "a sketch"} for n in names])
    return ds, outside


def test_links_out_of_the_dataset_folder_are_never_read(tmp_path):
    ds, _ = linked_dataset(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    params_for(work, ds)
    fetched = stage(work, "stages.fetch", "data", "data/raw")
    assert fetched.returncode == 0, fetched.stderr
    split_run = stage(work, "stages.split", "data/raw", "data/split", "reports/split.json")
    assert split_run.returncode == 0, split_run.stderr

    written = [p for p in (work / "data").rglob("*") if p.is_file()] + [work / "reports/split.json"]
    assert work / "data/raw/fetch_manifest.json" in written and work / "data/split/skipped.csv" in written
    assert all(MARKER.encode() not in p.read_bytes() for p in written)
    assert MARKER not in fetched.stderr + split_run.stderr
    assert not [p for p in (work / "data").rglob("*") if p.is_symlink()]
    with (work / "data/split/skipped.csv").open() as handle:
        skipped = {row["file_name"]: row["reason"] for row in csv.DictReader(handle)}
    assert skipped == {
        "secret.png": OUTSIDE, "absolute.png": OUTSIDE, "sub/climb.png": OUTSIDE, "outside_dir/inner.png": OUTSIDE,
        "x.png": "a folder where an image file should be", "../outside/secret.png": LEAVES,
        str(tmp_path / "outside" / "secret.png"): LEAVES, "outside_dir": OUTSIDE, "notes.txt": OUTSIDE,
    }
    kept = {json.loads(line)["file_name"] for name in ("train", "val", "test")
            for line in (work / f"data/split/{name}.jsonl").read_text().splitlines()}
    assert {"inside.png", "sub/up.png"} <= kept and len(kept) == 22
    assert (work / "data/raw/inside.png").read_bytes() == (ds / "00000.png").read_bytes()


def test_a_metadata_file_linked_from_outside_is_never_read(tmp_path):
    outside, ds = tmp_path / "outside", tmp_path / "dataset"
    make_synthetic_sketches(outside, 2, 32, seed=0)
    write_jsonl(outside / "metadata.jsonl", [{"file_name": "00000.png", "text": MARKER}])
    make_synthetic_sketches(ds, 2, 32, seed=0)
    (ds / "metadata.jsonl").unlink()
    (ds / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    with pytest.raises(UserError, match=f"metadata.jsonl: {OUTSIDE}; put the metadata file itself in the folder"):
        copy_dataset(ds, tmp_path / "out")

    (ds / "metadata.jsonl").unlink()
    write_jsonl(ds / "meta" / "v2.jsonl", [{"file_name": "00001.png", "text": "a house"}])
    (ds / "metadata.jsonl").symlink_to("meta/v2.jsonl")  # inside the folder: fine
    copy_dataset(ds, tmp_path / "ok")
    assert read_metadata(tmp_path / "ok") == [{"file_name": "00001.png", "text": "a house"}]
    assert not (tmp_path / "ok" / "metadata.jsonl").is_symlink()


def test_special_files_and_odd_links_are_skipped_with_a_reason(tmp_path):
    ds = tmp_path / "dataset"
    make_synthetic_sketches(ds, 2, 32, seed=0)
    os.mkfifo(ds / "pipe.png")  # reading it would block fetch forever
    (ds / "dangling.png").symlink_to("nowhere.png")
    (ds / "loop.png").symlink_to("loop.png")
    (ds / "self").symlink_to(".")  # a folder link inside: not followed, so no endless copy
    (ds / FETCH_SKIPPED).write_text("file_name,reason\n00000.png,forged\n")
    copy_dataset(ds, tmp_path / "out")
    with (tmp_path / "out" / FETCH_SKIPPED).open() as handle:
        skipped = {row["file_name"]: row["reason"] for row in csv.DictReader(handle)}
    assert skipped == {"pipe.png": "not a regular file", "dangling.png": "broken symbolic link",
                       "loop.png": "broken symbolic link", "self": "symbolic link to a folder (not followed)",
                       FETCH_SKIPPED: "name reserved for fetch's own records"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png", FETCH_SKIPPED, "metadata.jsonl"]


def test_a_hub_snapshot_links_into_its_blobs(tmp_path):
    repo = tmp_path / "hub" / "datasets--org--sketches"
    snapshot = repo / "snapshots" / ("0" * 40)
    table = pa.table({"image": [{"bytes": image_bytes("a.png"), "path": "a.png"}], "text": ["a house"]})
    (repo / "blobs").mkdir(parents=True)
    pq.write_table(table, repo / "blobs" / "abc123")
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "train.parquet").symlink_to("../../../blobs/abc123")
    copy_dataset(snapshot, tmp_path / "out")
    assert read_metadata(tmp_path / "out") == [{"file_name": "a.png", "text": "a house"}]
    assert imagefolder.boundary(tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()


def test_a_parquet_shard_linked_from_outside_is_never_read(tmp_path):
    outside, ds = tmp_path / "outside", tmp_path / "dataset"
    secret_png(outside / "secret.png")
    outside_table = pa.table({"image": [{"bytes": (outside / "secret.png").read_bytes(), "path": "s.png"}],
                              "text": [MARKER]})
    pq.write_table(outside_table, outside / "secret.parquet")
    make_synthetic_sketches(tmp_path / "sketches", 2, 32, seed=0)
    rows = read_metadata(tmp_path / "sketches")
    images = [{"bytes": (tmp_path / "sketches" / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows]
    (ds / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image": images, "text": [r["text"] for r in rows]}), ds / "data" / "train.parquet")
    (ds / "data" / "evil.parquet").symlink_to(outside / "secret.parquet")
    copy_dataset(ds, tmp_path / "out")
    assert all(MARKER.encode() not in p.read_bytes() for p in (tmp_path / "out").rglob("*"))
    assert (tmp_path / "out" / FETCH_SKIPPED).read_text().splitlines()[1] == f"data/evil.parquet,{OUTSIDE}"
    assert [r["file_name"] for r in read_metadata(tmp_path / "out")] == ["00000.png", "00001.png"]


def test_metadata_csv_becomes_metadata_jsonl(tmp_path):
    ds = tmp_path / "dataset"
    make_synthetic_sketches(ds, 3, 32, seed=0)
    (ds / "metadata.jsonl").unlink()
    (ds / "metadata.csv").write_bytes("\ufefffile_name,text,author\n00000.png,\"a house, a tree\",me\n"
                                      "00001.png,,you\n00002.png\n".encode())
    copy_dataset(ds, tmp_path / "out")
    assert read_metadata(tmp_path / "out") == [
        {"file_name": "00000.png", "text": "a house, a tree", "author": "me"},
        {"file_name": "00001.png", "text": "", "author": "you"},
        {"file_name": "00002.png", "text": None, "author": None}]
    assert not (tmp_path / "out" / "metadata.csv").exists()

    (ds / "metadata.csv").write_text("image,caption\n00000.png,a house\n")
    with pytest.raises(UserError, match=r"metadata\.csv: columns image, caption; its first line must name the columns"):
        copy_dataset(ds, tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------- same split

ROWS = [(f"{i:05d}.png", f"scene {i}") for i in range(12)] + [
    ("tiny.png", "a dot"), ("corrupt.png", "broken"), ("null.png", None), ("00003.png", "listed again"),
    ("../up.png", "climbs out"), ("sub/deep.png", "in a folder")]


def image_bytes(name: str) -> bytes:
    """A PNG for each name (8x8 for tiny.png), or broken bytes for corrupt.png."""
    if name == "corrupt.png":
        return b"\x89PNG\r\n\x1a\n" + bytes(100)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8) if name == "tiny.png" else (32 + len(name), 32), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def as_formats(root: Path) -> dict[str, Path]:
    """One dataset as an imagefolder with metadata.jsonl, one with metadata.csv, and parquet shards."""
    images = {name: image_bytes(name) for name, _ in ROWS if name != "../up.png"}
    folders = {"jsonl": root / "jsonl", "csv": root / "csv", "parquet": root / "parquet"}
    for name, data in images.items():
        for kind in ("jsonl", "csv"):
            (folders[kind] / name).parent.mkdir(parents=True, exist_ok=True)
            (folders[kind] / name).write_bytes(data)
    write_jsonl(folders["jsonl"] / "metadata.jsonl", [{"file_name": n, "text": t} for n, t in ROWS])
    with (folders["csv"] / "metadata.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("file_name", "text"), *ROWS])
    parquet_rows = [({"bytes": images.get(n, b"x"), "path": n}, t) for n, t in ROWS]
    folders["parquet"].mkdir()
    for i, part in enumerate((parquet_rows[:9], parquet_rows[9:])):
        table = pa.table({"image": [image for image, _ in part], "text": [text for _, text in part]})
        pq.write_table(table, folders["parquet"] / f"train-{i}.parquet")
    return folders


def test_every_format_gives_the_same_split_and_skipped_list(tmp_path):
    results = {}
    for kind, folder in as_formats(tmp_path / "sources").items():
        raw, out = tmp_path / kind / "raw", tmp_path / kind / "split"
        copy_dataset(folder, raw)
        metrics = split.run(raw, out, tmp_path / kind / "split.json", SPLIT)
        results[kind] = metrics, {p.name: p.read_text() for p in sorted(out.iterdir())}
    assert results["jsonl"] == results["csv"] == results["parquet"]
    metrics, files = results["parquet"]
    assert metrics["n_examples"] == len(ROWS) and metrics["n_skipped"] == 4 and metrics["n_duplicate_rows"] == 0
    skipped = {row["file_name"]: row["reason"] for row in csv.DictReader(io.StringIO(files["skipped.csv"]))}
    assert skipped == {"tiny.png": "too small (8x8 < 32 px)", "corrupt.png": skipped["corrupt.png"],
                       "null.png": "empty caption", "../up.png": LEAVES}
    # 00003.png, listed again with another caption, is a second example of the same image, in the same split
    captions = {name: [row["text"] for row in map(json.loads, text.splitlines()) if row["file_name"] == "00003.png"]
                for name, text in files.items() if name.endswith(".jsonl")}
    assert sorted(texts for texts in captions.values() if texts) == [["scene 3", "listed again"]]
    assert metrics["n_images"] == 13 and sum(metrics[f"n_{k}"] for k in SPLIT["fractions"]) == 14
    assert skipped["corrupt.png"].startswith("not decodable: ") and str(tmp_path) not in skipped["corrupt.png"]
