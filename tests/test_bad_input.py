"""The bad-input catalogue, through the stages' real command lines on the smoke setting.

Data problems are skipped per file and recorded in data/split/skipped.csv; everything else stops before any heavy
work with one line naming the file or key, exit code 2 and no traceback.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylestudy.models import builders
from stylestudy.core.config import compose_params
from stylestudy.data.dataset import read_metadata, write_jsonl
from stylestudy.data.sketches import make_synthetic_sketches

REPO = Path(__file__).resolve().parents[1]
OK_ODDITIES = {"rgba.png", "palette.png", "cmyk.jpg", "gray16.png"}
EXPECTED_SKIPS = {
    "corrupt.png": "not decodable", "truncated.jpg": "not decodable", "zero_bytes.png": "empty file",
    "bomb.png": "decompression bomb", "missing.png": "missing file", "empty_caption.png": "empty caption",
    "blank_caption.png": "empty caption", "one_pixel.png": "too small (1x1 < 32 px)",
    "null_caption.png": "empty caption", "no_caption.png": "empty caption", "number_caption.png": "caption is not text",
    "../escape.png": "file_name leaves the dataset folder", "/etc/hostname": "file_name leaves the dataset folder",
    "folder.png": "a folder where an image file should be",
}
REPEATED = "00001.png"  # listed again with its own caption: a duplicate row, counted once, not unusable
N_EXAMPLES = 40 + len(OK_ODDITIES) + len(EXPECTED_SKIPS) + 1
CAPTIONS = {"empty_caption.png": "", "blank_caption.png": "  \t ", "null_caption.png": None, "number_caption.png": 42}


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A folder with the smoke params.yaml, as the stages see the repository root."""
    compose_params(tmp_path / "params.yaml", REPO, ["profile=smoke"])
    return tmp_path


def stage(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=workdir, env=env, capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0]
    return errors[0]


def add_odd_images(raw: Path) -> list[dict]:
    """Write every odd and broken file of the catalogue into an imagefolder; return their metadata rows."""
    jpeg = raw / "truncated.jpg"
    Image.new("RGB", (64, 48), "gray").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (raw / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (raw / "zero_bytes.png").write_bytes(b"")
    Image.new("1", (20000, 20000)).save(raw / "bomb.png")  # 400 Mpixel: over twice PIL's limit
    Image.new("RGBA", (40, 32), (0, 0, 0, 0)).save(raw / "rgba.png")
    Image.new("P", (32, 40), 3).save(raw / "palette.png")
    Image.new("CMYK", (50, 50), (0, 0, 0, 255)).save(raw / "cmyk.jpg")
    Image.fromarray(np.full((33, 32), 40000, dtype=np.uint16)).save(raw / "gray16.png")
    Image.new("RGB", (1, 1), "white").save(raw / "one_pixel.png")
    for name in ("empty_caption.png", "blank_caption.png", "null_caption.png", "no_caption.png",
                 "number_caption.png", "unlisted.png"):
        Image.new("RGB", (32, 32), "white").save(raw / name)
    (raw / "folder.png").mkdir()
    rows = [{"file_name": name, "text": CAPTIONS.get(name, "a sketch")} for name in [*OK_ODDITIES, *EXPECTED_SKIPS]]
    repeated = [row for row in read_metadata(raw) if row["file_name"] == REPEATED]
    return [row if row["file_name"] != "no_caption.png" else {"file_name": "no_caption.png"} for row in rows] + repeated


@pytest.fixture
def odd_dataset(workdir) -> Path:
    raw = workdir / "data" / "raw"
    make_synthetic_sketches(raw, 40, 32, seed=0)
    write_jsonl(raw / "metadata.jsonl", read_metadata(raw) + add_odd_images(raw))
    return raw


def test_split_skips_and_records_each_bad_file(workdir, odd_dataset):
    params = (workdir / "params.yaml").read_text().replace("max_bad_fraction: 0.05", "max_bad_fraction: 0.3")
    (workdir / "params.yaml").write_text(params)
    result = stage(workdir, "stages.split", "data/raw", "data/split", "reports/split.json")
    assert result.returncode == 0, result.stderr
    with (workdir / "data/split/skipped.csv").open() as handle:
        skipped = {row["file_name"]: row["reason"] for row in csv.DictReader(handle)}
    assert set(skipped) == set(EXPECTED_SKIPS) | {"unlisted.png", REPEATED}
    for name, reason in EXPECTED_SKIPS.items():
        assert reason in skipped[name], (name, skipped[name])
    assert skipped["unlisted.png"] == "not in metadata.jsonl"
    assert skipped[REPEATED] == "duplicate row: the same file and caption as line 2"
    kept = [row["file_name"] for name in ("train", "val", "test")
            for row in map(json.loads, (workdir / f"data/split/{name}.jsonl").read_text().splitlines())]
    assert OK_ODDITIES <= set(kept) and len(kept) == len(set(kept)) == 40 + len(OK_ODDITIES)  # the repeat once
    metrics = json.loads((workdir / "reports/split.json").read_text())
    assert metrics["n_skipped"] == len(EXPECTED_SKIPS) and metrics["n_examples"] == N_EXAMPLES
    assert metrics["n_duplicate_rows"] == 1 and metrics["n_images"] == 40 + len(OK_ODDITIES)


def test_split_stops_when_too_much_data_is_bad(workdir, odd_dataset):
    result = stage(workdir, "stages.split", "data/raw", "data/split", "reports/split.json")
    error = assert_one_line_error(result, f"{len(EXPECTED_SKIPS)} of {N_EXAMPLES} examples are unusable (",
                                  "all listed in data/split/skipped.csv); fix the data or raise split.max_bad_fraction")
    for count in ("4 empty caption", "2 not decodable", "2 file_name leaves the dataset folder", "1 too small",
                  "1 image too large", "1 a folder where an image file should be"):
        assert count in error
    assert "duplicate" not in error  # a repeated row is not unusable
    with (workdir / "data/split/skipped.csv").open() as handle:
        assert {row["file_name"] for row in csv.DictReader(handle)} == set(EXPECTED_SKIPS) | {"unlisted.png",
                                                                                              REPEATED}
    assert os.listdir(workdir / "data/split") == ["skipped.csv"], "no split files: nothing looks complete"
    assert not (workdir / "reports/split.json").exists()


BROKEN_LINES = [
    (b"not json at all\n", "not JSON (Expecting value)"),
    (b'{"file_name": "00000.png", "text": "caf\xe9"}\n', "not valid UTF-8"),
    (b'{"text": "a house"}\n', 'no "file_name" string'),
    (b'"00000.png"\n', "expected a JSON object, got str"),
]


def insert_line(raw: Path, line: bytes) -> None:
    """`line` as line 3 of metadata.jsonl."""
    lines = (raw / "metadata.jsonl").read_bytes().splitlines(keepends=True)
    (raw / "metadata.jsonl").write_bytes(b"".join(lines[:2]) + line + b"".join(lines[2:]))


@pytest.mark.parametrize("line, reason", BROKEN_LINES)
def test_a_broken_metadata_line_is_skipped_with_its_number(workdir, line, reason):
    raw = workdir / "data" / "raw"
    make_synthetic_sketches(raw, 40, 32, seed=0)
    insert_line(raw, line)
    result = stage(workdir, "stages.split", "data/raw", "data/split", "m.json")
    assert result.returncode == 0, result.stderr
    with (workdir / "data/split/skipped.csv").open() as handle:
        assert list(csv.DictReader(handle)) == [{"file_name": "", "reason": f"not a row of metadata.jsonl (line 3: "
                                                                            f"{reason})"}]
    metrics = json.loads((workdir / "m.json").read_text())
    assert (metrics["n_examples"], metrics["n_skipped"], metrics["n_images"]) == (41, 1, 40)  # no valid row lost


def test_mostly_broken_metadata_still_stops_with_one_line(workdir):
    raw = workdir / "data" / "raw"
    make_synthetic_sketches(raw, 4, 32, seed=0)
    insert_line(raw, BROKEN_LINES[0][0])
    result = stage(workdir, "stages.split", "data/raw", "data/split", "m.json")
    assert_one_line_error(result, "1 of 5 examples are unusable (1 not a row of metadata.jsonl;",
                          "fix the data or raise split.max_bad_fraction")


def test_a_missing_input_folder_names_the_stage_to_run(workdir):
    result = stage(workdir, "stages.split", "data/raw", "data/split", "m.json")
    assert_one_line_error(result, "data/raw", "run the fetch stage first")


def sd_folder_variants(root: Path) -> dict[str, tuple[Path, str]]:
    """Model folders of the wrong kind or shape, and the words the error must contain."""
    sd, clip = root / "sd", root / "clip"
    builders.save_tiny_sd(sd, seed=0)
    builders.save_tiny_clip(clip, seed=0)
    no_unet, pickled = root / "no_unet", root / "pickled"
    for target in (no_unet, pickled):
        subprocess.run(["cp", "-r", str(sd), str(target)], check=True)
    subprocess.run(["rm", "-r", str(no_unet / "unet")], check=True)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    return {"clip as sd": (clip, "model_index.json"), "no unet": (no_unet, "unet"),
            "pickle only": (pickled, "safetensors"), "nowhere": (root / "nowhere", "does not exist")}


def test_wrong_model_folders_stop_before_loading(workdir):
    for case, (folder, words) in sd_folder_variants(workdir / "models").items():
        result = stage(workdir, "stages.generate", "base", str(folder), "data/split", "out")
        assert_one_line_error(result, str(folder), words)
        assert not (workdir / "out").exists(), case


@pytest.mark.parametrize("key, value, words", [
    ("images_per_prompt", "0", "generate.images_per_prompt must be a positive integer"),
    ("prompts", "[]", "generate.prompts must be a non-empty list"),
    ("resolution", "30", "generate.resolution must be a positive integer divisible by 8"),
    ("scheduler", "magic", "generate.scheduler must be one of"),
])
def test_bad_generate_parameters_stop_with_one_line(workdir, key, value, words):
    import yaml

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["generate"][key] = yaml.safe_load(value)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert_one_line_error(stage(workdir, "stages.generate", "base", "models/sd", "data/split", "out"), words)
